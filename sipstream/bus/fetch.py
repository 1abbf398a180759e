"""Reading a topic by (partition, offset): the reader replay, export and the experiment share.

Unlike a group consumer, it reads exactly the records it is asked for, in the order asked, with one
assign()ed consumer per partition, and never relies on watermarks (the embedded broker's undercount)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from sipstream.bus.client import admin_config, check_reachable, consumer_config
from sipstream.errors import UserError


def retention_error(topic: str, partition: int, wanted: int, first: int) -> UserError:
    return UserError(
        f"{topic} partition {partition}: the run recorded offsets from {wanted}, but the broker's first retained "
        f"record is now {first} (records {wanted}..{first - 1} were deleted by retention); keep replayable topics "
        f"forever with retention.ms=-1 (`kafka-configs --alter --entity-type topics --entity-name {topic} "
        "--add-config retention.ms=-1`, as topics/*.yaml set it), or archive runs with `sipstream export` and "
        "replay them from `sipstream import`")


def require_topics(bus: Any, bootstrap: str, wanted: dict[str, list[int]], hint: str, timeout: float = 10.0) -> None:
    """Fail at once, in one line, when the broker at `bootstrap` does not answer, or lacks a topic or a
    partition in `wanted` ({live topic name: partitions}): reading it would only wait for records that
    never come. `hint` says what to do instead."""
    check_reachable(bus, bootstrap, timeout)
    # All topics, not the wanted ones by name: asking for a topic by name auto-creates it on some brokers.
    metadata = AdminClient(admin_config(bus, bootstrap) | {"log_level": 0}).list_topics(timeout=timeout)
    for topic, partitions in wanted.items():
        found = metadata.topics.get(topic)
        if found is None or (found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise UserError(f"topic {topic} does not exist on {bootstrap}; {hint}")
        absent = sorted(set(partitions) - set(found.partitions))
        if absent:
            raise UserError(f"topic {topic} on {bootstrap} has {len(found.partitions)} partition(s), but the run "
                            f"recorded partition {absent[0]}; {hint}")


class RecordFetcher:
    """Reads records of one topic by (partition, offset), one assign()ed consumer per partition.

    Offsets are asked for in increasing order per partition (a consumption log is: within a
    partition the learner reads forward); an earlier offset re-seeks. Never relies on watermarks.
    A partition whose first record read lies *after* the offset asked for has lost that range to
    retention: a `UserError` says which and what to set."""

    def __init__(self, bus: Any, bootstrap: str, topic: str, timeout_s: float = 30.0, batch: int = 500) -> None:
        self.bus, self.bootstrap, self.topic = bus, bootstrap, topic
        self.timeout_s, self.batch = timeout_s, batch
        self.consumers: dict[int, Any] = {}
        self.buffers: dict[int, deque[Any]] = {}
        self.last: dict[int, int] = {}
        self.fresh: dict[int, bool] = {}  # True until the partition's first record was looked at

    def _open(self, partition: int, offset: int) -> None:
        if partition in self.consumers:
            self.consumers.pop(partition).close()
        conf = consumer_config(self.bus, self.bootstrap, group_id=f"{self.bus.group_prefix}.replay-reader")
        # An offset below the log start resets to the earliest retained record: that is how a lost
        # range shows (the first record read is later than the one asked for). Nothing is committed.
        conf |= {"auto.offset.reset": "earliest", "enable.partition.eof": False}
        consumer = Consumer(conf)
        consumer.assign([TopicPartition(self.topic, partition, offset)])
        self.consumers[partition] = consumer
        self.buffers[partition] = deque()
        self.fresh[partition] = True

    def _fill(self, partition: int) -> bool:
        got = False
        for msg in self.consumers[partition].consume(self.batch, timeout=0.5):
            err = msg.error()
            if err is None:
                self.buffers[partition].append(msg)
                got = True
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise UserError(f"topic {self.topic} does not exist on {self.bootstrap}; replay from the cluster that "
                                "holds the run, or put an export back first with `sipstream import`")
            elif err.fatal() or not err.retriable():
                raise KafkaException(err)
        return got

    def get(self, partition: int, offset: int) -> Any:
        if partition not in self.consumers or offset <= self.last.get(partition, -1):
            self._open(partition, offset)
        buffer = self.buffers[partition]
        deadline = time.monotonic() + self.timeout_s
        while True:
            while buffer and buffer[0].offset() < offset:
                buffer.popleft()
                self.fresh[partition] = False
            if buffer:
                msg = buffer.popleft()
                if msg.offset() > offset:
                    if self.fresh[partition]:
                        raise retention_error(self.topic, partition, offset, msg.offset())
                    raise UserError(f"{self.topic} partition {partition}: the recorded record at offset {offset} is "
                                    f"gone (the next one is {msg.offset()}; was the topic compacted?); replay from an "
                                    "export (`sipstream import`)")
                self.fresh[partition] = False
                self.last[partition] = offset
                return msg
            if not self._fill(partition) and time.monotonic() > deadline:
                raise UserError(f"{self.topic} partition {partition}: no record at offset {offset} within "
                                f"{self.timeout_s:.0f}s; the topic ends before the recorded range (was it deleted and "
                                "recreated?); replay from an export (`sipstream import`)")

    def read_range(self, partition: int, start: int, end: int) -> list[Any]:
        """Every record of [start, end) (gaps, e.g. from compaction, are allowed after the first record)."""
        out = []
        if end <= start:
            return out
        self._open(partition, start)
        first = self.get(partition, start)
        out.append(first)
        buffer = self.buffers[partition]
        deadline = time.monotonic() + self.timeout_s
        while out[-1].offset() < end - 1:
            if buffer:
                msg = buffer.popleft()
                if msg.offset() >= end:
                    break
                out.append(msg)
                deadline = time.monotonic() + self.timeout_s
            elif not self._fill(partition) and time.monotonic() > deadline:
                raise UserError(f"{self.topic} partition {partition}: only {len(out)} records of the recorded range "
                                f"{start}..{end - 1} arrived within {self.timeout_s:.0f}s; the topic lost records")
        self.last[partition] = out[-1].offset()
        return out

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
