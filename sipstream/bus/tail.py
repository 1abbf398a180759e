"""Following a topic from the outside: exact record counts and end offsets, without joining a group.

Why not `get_watermark_offsets`: the embedded Tansu broker reports wrong high watermarks (one per
produce batch rather than per record, seen on the memory and s3 engines), so exact progress is read by
consuming. A `TopicTail` keeps its consumer and reads only what is new on each `poll()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition


class TopicTail:
    """Reads a topic from the start with assign(), incrementally; tracks counts and end offsets."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int,
        on_record: Callable[[dict], None] | None = None,
        id_field: str | None = None,
        client: dict[str, Any] | None = None,
    ) -> None:
        """`client`: extra librdkafka settings (security: SASL/TLS), e.g. `client_settings(cfg.bus)`."""

        self.topic = topic
        self.partitions = partitions
        self.on_record = on_record
        self.id_field = id_field
        self.count = 0
        self.ids: set[str] = set()  # distinct values of `id_field` (at-least-once may repeat records)
        self._bootstrap = bootstrap
        self._client = dict(client or {})
        self._probes: dict[str, Any] = {}  # group → consumer that reads its committed offsets (never joins)
        self.next_offsets: dict[int, int] = {}
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"sipstream-tail-{topic}", "enable.auto.commit": False,
             "log.connection.close": False, **self._client}
        )
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])

    def poll(self, max_seconds: float = 0.5) -> int:
        """Consume what is new (up to about `max_seconds`); return how many records were read."""
        read = 0
        while True:
            batch = self._consumer.consume(1000, timeout=min(0.2, max_seconds))
            batch = [m for m in batch if m.error() is None]
            if not batch:
                return read
            for msg in batch:
                read += 1
                self.count += 1
                self.next_offsets[msg.partition()] = msg.offset() + 1
                if self.on_record is None and self.id_field is None:
                    continue
                # Not decode_record: a tail counts progress and shows records, it validates nothing and must
                # count every record (a dead letter, a foreign one), so anything that is not JSON is just counted.
                try:
                    value = json.loads(msg.value())
                except (ValueError, TypeError):
                    continue  # not JSON (or a tombstone): counted, not interpreted
                if self.id_field is not None and isinstance(value, dict) and self.id_field in value:
                    self.ids.add(str(value[self.id_field]))
                if self.on_record is not None:
                    self.on_record(value)

    def committed_by(self, group: str) -> bool:
        """True when `group` has committed every record read so far (a stage has caught up)."""

        probe = self._probes.get(group)
        if probe is None:  # kept across calls: `sipstream run` asks every second
            probe = Consumer({"bootstrap.servers": self._bootstrap, "group.id": group, "enable.auto.commit": False,
                              "log.connection.close": False, **self._client})
            self._probes[group] = probe
        committed = probe.committed([TopicPartition(self.topic, p) for p in self.next_offsets], timeout=10)
        return all(tp.offset >= self.next_offsets[tp.partition] for tp in committed)

    def close(self) -> None:
        for probe in self._probes.values():
            probe.close()
        self._consumer.close()

    def __enter__(self) -> TopicTail:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
