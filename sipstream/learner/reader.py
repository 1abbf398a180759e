"""Rank 0's side of the bus: the pairs a step trains on, what it produces, and the versions announced so far.

    PairReader      the sip.pairs consumer (assign()ed at the checkpoint's offsets), the producer of
                    weights, metrics and dead letters, and the commits
    consume_step    one step's pairs: every record looked at is decoded (`sipstream.bus.decode`, the
                    runner's checks), then trained or dropped for a counted reason
    announced_version  the newest version on sip.weights for a run (a restart numbers after it)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Producer,
    TopicPartition,
)

from sipstream.bus import topics as T
from sipstream.bus.client import consumer_config, producer_config, usable_messages
from sipstream.bus.deadletter import deadletter_from_message
from sipstream.bus.decode import Rejected, decode_record
from sipstream.bus.dedupe import SeenIds
from sipstream.bus.records import parse_weights_announcement
from sipstream.config.learner import LearnerConfig
from sipstream.errors import UserError
from sipstream.learner.checkpoint import LearnerState
from sipstream.learner.losses import Algo
from sipstream.learner.sequences import Example, continuation_texts, encode_example

# --------------------------------------------------------------------------- the bus


class PairReader:
    """Rank 0's side of the bus: the sip.pairs consumer, the producer, dead letters and commits."""

    def __init__(self, cfg: Any, bootstrap: str, positions: dict[int, int], instance_id: str, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.instance_id = instance_id
        self.specs = T.load_specs(T.topics_dir(cfg.bus))
        self.topic = cfg.bus.topic(T.PAIRS)
        self.delivery_errors: list[str] = []
        self.produced: dict[str, dict[int, list[int]]] = {}
        """{live topic: {partition: [first, last + 1]}} of the acknowledged records (for the manifest)."""
        self.producer = Producer(producer_config(cfg.bus, bootstrap, client_id=instance_id))
        self.consumer = Consumer(
            consumer_config(cfg.bus, bootstrap, group_id=f"{cfg.bus.group_prefix}.learner", client_id=instance_id)
        )
        metadata = self.consumer.list_topics(self.topic, timeout=30).topics.get(self.topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            self.consumer.close()
            raise UserError(f"topic {self.topic} does not exist; run `sipstream topics create` first")
        partitions = sorted(metadata.partitions)
        if positions:
            start = {p: positions.get(p, OFFSET_BEGINNING) for p in partitions}
        else:
            # No checkpoint: a fresh run starts where the group left off, else at the beginning.
            committed = self.consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=30)
            start = {tp.partition: tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed}
        # assign(), not subscribe(): the checkpoint, not the group, decides where reading resumes, and
        # there is no group join to wait for (docs/embedded-broker.md: several seconds on the embedded broker).
        self.consumer.assign([TopicPartition(self.topic, p, start[p]) for p in partitions])
        self.committed: dict[int, int] = {}
        self.deadlettered: Counter[str] = Counter()
        """Dead letters by failure class (for /metrics)."""

    def consume(self, count: int, timeout: float) -> list[Any]:
        """Up to `count` records (never more, so nothing is read ahead of the step that needs it)."""
        messages = self.consumer.consume(num_messages=count, timeout=timeout)
        self.producer.poll(0)  # serve delivery callbacks
        return usable_messages(messages, self.topic, self.log)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.delivery_errors.append(f"{msg.topic()}: {err.str()}")
            return
        span = self.produced.setdefault(msg.topic(), {}).setdefault(msg.partition(), [msg.offset(), msg.offset() + 1])
        span[0], span[1] = min(span[0], msg.offset()), max(span[1], msg.offset() + 1)

    def produce(self, topic: str, value: Mapping[str, Any]) -> None:
        spec = self.specs[topic]
        errors = spec.errors(value)
        if errors:  # our own record: a bug, not a data problem
            raise ValueError(f"learner produced an invalid {topic} record: {errors[:3]}")
        key = value.get(spec.key)
        self.producer.produce(self.cfg.bus.topic(topic), value=T.encode_value(value),
                              key=None if key is None else str(key).encode("utf-8"), on_delivery=self._on_delivery)

    def flush(self, what: str) -> None:
        """Wait for every acknowledgement (a sync point); a lost record is an error, never ignored."""
        remaining = self.producer.flush(30.0)
        if remaining or self.delivery_errors:
            errors, self.delivery_errors = self.delivery_errors, []
            raise RuntimeError(f"{what}: {remaining} record(s) unacknowledged, failures: {errors[:3]}")

    def deadletter(self, msg: Any, error: str, reason: str) -> None:
        self.produce(T.DEADLETTER, deadletter_from_message(msg, stage="learner", instance=self.instance_id, error=error,
                                                           reason=reason, limit=self.cfg.runner.deadletter_max_value_bytes))
        self.deadlettered[error] += 1
        self.log.warning("record dead-lettered", error=error, reason=reason[:300], topic=msg.topic(),
                         partition=msg.partition(), offset=msg.offset())

    def commit(self, positions: dict[int, int]) -> None:
        """Commit the offsets a checkpoint covers (a synchronous round trip to the broker)."""
        todo = {p: o for p, o in positions.items() if self.committed.get(p) != o}
        if not todo:
            return  # committing nothing new raises _NO_OFFSET (docs/embedded-broker.md)
        self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(todo.items())],
                             asynchronous=False)
        self.committed.update(todo)

    def close(self) -> None:
        try:
            self.producer.flush(10.0)
        finally:
            self.consumer.close()


def announced_version(bus: Any, bootstrap: str, run_name: str, log: Any, timeout_s: float = 30.0) -> int:
    """The highest version announced on sip.weights for `run_name` (0 when none was).

    Read from the beginning to the end-of-partition event, never from the watermarks (the embedded
    broker undercounts them). One pass per learner start: about 0.6 s on the embedded broker."""
    topic = bus.topic(T.WEIGHTS)
    partitions = T.load_specs(T.topics_dir(bus))[T.WEIGHTS].partitions
    conf = consumer_config(bus, bootstrap, group_id=f"{bus.group_prefix}.learner.versions")
    # The read ends at the partition's end: an empty fetch need not wait on the broker for new records.
    conf |= {"enable.partition.eof": True, "fetch.wait.max.ms": 50}
    consumer = Consumer(conf)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    latest, ended = 0, set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(ended) < partitions:
            if time.monotonic() > deadline:
                raise UserError(f"could not read {topic} to its end within {timeout_s:.0f}s (to number this learner's "
                                "weights after those already announced); is the broker reachable?")
            for msg in consumer.consume(100, timeout=0.2):
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    ended.add(msg.partition())
                    continue
                for record in usable_messages([msg], topic, log):
                    ended.discard(record.partition())  # more arrived after its end: read on
                    try:
                        announcement = parse_weights_announcement(json.loads(record.value()))
                    except (ValueError, TypeError):
                        continue  # not an announcement a worker would load either
                    if announcement["run_name"] == run_name:
                        latest = max(latest, announcement["version"])
    finally:
        consumer.close()
    return latest


# --------------------------------------------------------------------------- one step's pairs


@dataclass
class StepInput:
    """The pairs of one optimizer step and the records accounted for while collecting them."""

    examples: list[Example] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    """Next offset per partition after every record looked at (trained or skipped)."""
    counters: Counter[str] = field(default_factory=Counter)
    item_ids: list[str] = field(default_factory=list)
    records: list[tuple[int, int]] = field(default_factory=list)
    """(partition, offset) of every record looked at, in delivery order (the consumption log's line)."""
    trained: list[int] = field(default_factory=list)
    """Indices into `records` of the records that became examples."""
    end: str | None = None
    """Why collection ended short of a full step: `stop` (SIGTERM/SIGINT) or `idle`. The loop trains
    and accounts what was collected either way, then stops."""


def consume_step(
    reader: PairReader, state: LearnerState, seen: SeenIds, algo: Algo, cfg: LearnerConfig, tokenizer: Any,
    max_seq_tokens: int, stopping: Callable[[], bool],
) -> StepInput:
    """Collect one step's pairs: dead-letter what does not decode (`decode_record`: size limit, UTF-8,
    JSON, lone surrogates, schema), skip and count duplicates, pairs the algorithm cannot use, stale
    and empty pairs. Nothing here changes `state`: the caller accounts the step."""
    want = cfg.batch_pairs * cfg.grad_accum
    batch = StepInput()
    spec = reader.specs[T.PAIRS]
    idle_since = time.monotonic()
    while len(batch.examples) < want:
        if stopping():
            batch.end = "stop"
            return batch
        records = reader.consume(want - len(batch.examples), cfg.poll_timeout_s)
        if not records:
            if cfg.idle_timeout_s is not None and time.monotonic() - idle_since >= cfg.idle_timeout_s:
                batch.end = "idle"
                return batch
            continue
        idle_since = time.monotonic()
        for msg in records:
            batch.positions[msg.partition()] = msg.offset() + 1
            batch.records.append((msg.partition(), msg.offset()))
            batch.counters["consumed"] += 1
            pair = decode_record(msg.value(), spec, reader.cfg.runner.max_record_bytes)
            if isinstance(pair, Rejected):
                reader.deadletter(msg, pair.error, pair.reason)
                batch.counters["deadlettered"] += 1
                continue
            if pair["item_id"] in seen or pair["item_id"] in batch.item_ids:
                batch.counters["skipped_duplicate"] += 1
                continue
            texts = continuation_texts(pair, algo.continuations)
            if texts is None:  # dpo: an exact tie (no chosen/rejected); nll: nothing passed the threshold
                batch.counters[f"skipped_no_{algo.continuations[-1] if algo.name == 'dpo' else algo.continuations[0]}"] += 1
                continue
            lag = state.version - pair["policy_version"]
            if algo.name != "pretrain" and lag > cfg.max_policy_lag:  # the original suffix never goes stale
                batch.counters["stale"] += 1
                if cfg.stale_pairs == "drop":
                    batch.counters["dropped_stale"] += 1
                    continue
            example = encode_example(tokenizer, pair, texts, max_seq_tokens)
            if algo.name != "dpo" and example.continuation_lengths[0] == 0:
                batch.counters["skipped_empty"] += 1
                continue
            batch.counters["policy_lag_sum"] += max(lag, 0)
            batch.trained.append(len(batch.records) - 1)
            batch.item_ids.append(pair["item_id"])
            batch.examples.append(example)
    return batch
