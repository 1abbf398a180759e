"""The stage runner: the one piece of plumbing every stage uses.

    consume a batch → decode + schema-validate → stage.process_batch() → validate output → produce
    → wait for every delivery acknowledgement → commit the batch's offsets

Delivery guarantee: **at-least-once**. Offsets are committed only after all records produced for the
batch (outputs and dead letters) are acknowledged by the broker, so a crash anywhere re-delivers the
batch; duplicates are removed downstream by `item_id`. A record that cannot be processed (too large,
not UTF-8, not JSON, schema violation, processor exception, invalid output, an output too large to
produce) goes to `sip.deadletter` with its reason, source coordinates and original bytes, and the
stream continues. One limit, `runner.max_record_bytes`, bounds what is read and what is written (the
producer's `message.max.bytes` derives from it), so no record can stop a stage at produce time. SIGTERM finishes
the batch in hand, flushes, commits and leaves the group; `abandon()` (the same signal a second time) leaves the
batch in hand at once, uncommitted: the next consumer of the group is handed it again, so nothing is lost.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from sipstream.bus import topics as T
from sipstream.bus.client import consumer_config, producer_config, usable_messages
from sipstream.bus.deadletter import deadletter_from_message
from sipstream.bus.decode import Rejected, decode_record
from sipstream.config import Config
from sipstream.errors import BrokerError, UserError
from sipstream.telemetry.health import start_health_server
from sipstream.telemetry.logs import get_logger
from sipstream.telemetry.metrics import ProcessMetrics

Item = dict[str, Any]
# What a stage consumes and produces: the TypedDicts of `bus/records.py` (a TypedDict is a dict at run time).
In = TypeVar("In")
Out = TypeVar("Out")
# Produce errors that belong to one record, not to the producer or the cluster: its source is dead-lettered.
SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


def record_fields(msg: Any, item: Item | None = None) -> dict[str, Any]:
    """Log fields that find a record again: its coordinates and, when decoded, its item."""
    fields: dict[str, Any] = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
    for key in ("item_id", "doc_id", "policy_version"):
        if item is not None and isinstance(item, dict) and key in item:
            fields[key] = item[key]
    return fields


class Stage(Generic[In, Out]):
    """A stream processor: `process(item) -> list[item]` plus whatever model it holds.

    Subclasses name the records they consume and produce (`Stage[Prefix, Rewritten]`), set `name`,
    `input_topic`, `output_topic` and implement `process` (or `process_batch` when batching across items
    pays, as for model calls). They never touch Kafka.
    """

    name: str = "stage"
    input_topic: str = ""
    output_topic: str | None = None
    # Topics read in full by every instance (not shared in a group), e.g. weight announcements.
    control_topics: tuple[str, ...] = ()

    def process(self, item: In) -> list[Out]:
        raise NotImplementedError

    def process_batch(self, items: list[In]) -> list[list[Out]]:
        """Outputs per input, in order. Raising here makes the runner retry the items one by one."""
        return [self.process(item) for item in items]

    def on_control(self, topic: str, value: Item) -> None:
        """A record of one of `control_topics` arrived (validated against its schema)."""

    def before_batch(self) -> None:
        """Called between batches, after control records were delivered (e.g. to load new weights)."""

    def stage_counters(self) -> dict[str, float]:
        """Stage-specific counters published with the runner's metrics (e.g. chosen candidates by kind)."""
        return dict(getattr(self, "counters", {}))

    def close(self) -> None:
        """Release models and files."""


class BatchAbandoned(BaseException):
    """Raised into a runner's loop by `abandon()`: the batch in hand is left uncommitted. A BaseException, as
    KeyboardInterrupt is: the runner's and the stages' `except Exception` must not swallow it."""


def _raise_in_thread(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in Python thread `thread_id` at its next bytecode (None: withdraw one not raised yet). A
    model call is many short torch ops, so it is left within one op; a long call into C finishes first."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class DeliveryError(BrokerError):
    """Produced records were not acknowledged; the batch is not committed and will be re-delivered."""


@dataclass
class RunnerStats:
    counters: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.time)


def default_instance_id(stage: str) -> str:
    return f"{stage}-{socket.gethostname()}-{os.getpid()}"


class StageRunner:
    """Runs one `Stage` against a Kafka cluster until stopped."""

    def __init__(
        self,
        stage: Stage,
        cfg: Config,
        bootstrap: str,
        *,
        instance_id: str | None = None,
        static_membership: bool = False,
        specs: dict[str, T.TopicSpec] | None = None,
        model_load_seconds: float | None = None,
    ) -> None:
        """`model_load_seconds`: how long building the stage (its model) took, for /metrics."""

        self.stage = stage
        self.cfg = cfg
        self.specs = specs or T.load_specs(T.topics_dir(cfg.bus))
        for topic in filter(None, (stage.input_topic, stage.output_topic, *stage.control_topics)):
            if topic not in self.specs:
                raise UserError(f"stage {stage.name} uses topic {topic}, which has no spec in topics/")
        self.input_spec = self.specs[stage.input_topic]
        self.output_spec = self.specs[stage.output_topic] if stage.output_topic else None
        self.instance_id = instance_id or default_instance_id(stage.name)
        self.log = get_logger(stage=stage.name, instance=self.instance_id)
        # Per-record events only when asked for: building them costs more than echoing a record.
        self._log_records = cfg.logging.level == "debug"
        self.stats = RunnerStats()
        self._stopping = False
        # abandon(): who is in a batch (the thread id) and whether it was told to leave it; guarded by the lock.
        self._batch_lock = threading.RLock()  # re-entrant: abandon() may run in a signal handler on the loop's thread
        self._batch_thread: int | None = None
        self._abandoning = False
        self._abandon_sent = False
        self._delivery_errors: list[str] = []
        self._refused: list[tuple[Any, Rejected]] = []  # (source record, why) of outputs the broker refused
        self._last_metrics = time.monotonic()

        self.producer = Producer(producer_config(cfg.bus, bootstrap, client_id=self.instance_id,
                                                 max_record_bytes=cfg.runner.max_record_bytes))
        self.consumer = Consumer(
            consumer_config(
                cfg.bus,
                bootstrap,
                group_id=f"{cfg.bus.group_prefix}.{stage.name}",
                client_id=self.instance_id,
                instance_id=self.instance_id if static_membership else None,
            )
        )
        self.metrics = ProcessMetrics("worker", run=cfg.run_name, stage=stage.name)
        self.metrics.set("sipstream_model_load_seconds", model_load_seconds)
        self._observe_stage()
        self.health = start_health_server(cfg.runner.health_port, cfg.runner.health_host, metrics=self.metrics.text,
                                          stale_after_s=cfg.runner.health_stale_after_s)
        self.control = None
        if stage.control_topics:

            # assign(), not subscribe(): every instance must see every control record, from the start,
            # so a restarted worker catches up to the latest announcement.
            self.control = Consumer(
                consumer_config(cfg.bus, bootstrap, group_id=f"{cfg.bus.group_prefix}.{stage.name}.control",
                                client_id=self.instance_id)
            )
            self.control.assign([
                TopicPartition(cfg.bus.topic(t), p, 0)
                for t in stage.control_topics for p in range(self.specs[t].partitions)
            ])

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and exit (safe from a signal handler)."""
        self._stopping = True

    def abandon(self) -> None:
        """Stop now: leave the batch in hand without committing it (safe from a signal handler, from any thread).

        For a stop that cannot wait for a slow batch (a second SIGTERM; `sipstream run` sends it when an
        interrupted worker is past its grace). At-least-once keeps it safe: the batch's offsets are not
        committed, so the group's next consumer is handed it again; outputs it already produced are
        duplicates that downstream drops by `item_id`."""
        self._stopping = True
        with self._batch_lock:
            self._abandoning = True
            if self._batch_thread is None or self._abandon_sent:
                return  # between batches: the loop leaves at its next turn
            self._abandon_sent = True
            if self._batch_thread == threading.get_ident():
                raise BatchAbandoned  # a signal handler running on the loop's own thread
            _raise_in_thread(self._batch_thread, BatchAbandoned)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------------ the loop

    def run(self, *, max_batches: int | None = None, until: Callable[[RunnerStats], bool] | None = None) -> RunnerStats:
        """Consume, process, produce and commit until `stop()` (or `max_batches`, or `until(stats)`)."""
        self.consumer.subscribe([self.cfg.bus.topic(self.stage.input_topic)])
        self.log.info("stage started", topic=self.stage.input_topic, output=self.stage.output_topic)
        batches = 0
        try:
            while not self._stopping:
                self._deliver_control()
                self._before_batch()
                # consume() is the batched form of poll(): it also serves the consumer's callbacks.
                messages = self.consumer.consume(
                    num_messages=self.cfg.runner.batch_size, timeout=self.cfg.runner.batch_timeout_s
                )
                self.producer.poll(0)  # serve delivery callbacks of earlier produces
                self.health.beat()
                records = usable_messages(messages, self.cfg.bus.topic(self.stage.input_topic), self.log)
                if records:
                    if not self._handle_batch_unless_abandoned(records):
                        break
                    batches += 1
                self._maybe_publish_metrics()
                if max_batches is not None and batches >= max_batches:
                    break
                if until is not None and until(self.stats):
                    break
        finally:
            self._shutdown()
        return self.stats

    def _handle_batch_unless_abandoned(self, records: list[Any]) -> bool:
        """Handle a batch; False when `abandon()` made the loop leave it, uncommitted."""
        try:
            try:
                with self._batch_lock:
                    if self._abandoning:
                        raise BatchAbandoned
                    self._batch_thread = threading.get_ident()
                self._handle_batch(records)
            finally:
                with self._batch_lock:
                    self._batch_thread = None
                    if self._abandon_sent:  # sent but not raised yet (the batch ended first): withdraw it
                        _raise_in_thread(threading.get_ident(), None)
        except BatchAbandoned:
            self.stats.counters["abandoned_batches"] += 1
            self.log.warning("batch abandoned at the stop, uncommitted: the group's next consumer is handed it again",
                             records=len(records), topic=records[0].topic())
            return False
        return True

    def _handle_batch(self, records: list[Any]) -> None:
        batch_started = time.perf_counter()
        c = self.stats.counters
        c["consumed"] += len(records)
        self.metrics.inc("sipstream_records_consumed_total", len(records), topic=records[0].topic())
        items: list[Item] = []
        sources: list[Any] = []
        for msg in records:
            decoded = self._decode(msg)
            if isinstance(decoded, Rejected):
                self._deadletter(msg, decoded)
            else:
                items.append(decoded)
                sources.append(msg)

        t0 = time.perf_counter()
        produced = 0
        for msg, item, outcome in zip(sources, items, self._process(items, sources), strict=True):
            if isinstance(outcome, Rejected):
                self._deadletter(msg, outcome, item)
                continue
            failure = self._produce_outputs(msg, outcome)
            if failure is not None:
                self._deadletter(msg, failure, item)
                continue
            c["processed"] += 1
            c["produced"] += len(outcome)
            produced += len(outcome)
            self._log_processed(msg, item, outcome)
        c["process_seconds"] += time.perf_counter() - t0

        refused = self._await_acknowledgements()
        c["produced"] -= refused
        produced -= refused
        self._commit(records)
        c["batches"] += 1
        if produced and self.stage.output_topic:
            self.metrics.inc("sipstream_records_produced_total", produced, topic=self.cfg.bus.topic(self.stage.output_topic))
        self.metrics.observe("sipstream_batch_duration_seconds", time.perf_counter() - batch_started)
        self._observe_stage()
        self.log.debug("batch committed", records=len(records), produced=produced, **self._policy_version())

    def _process(self, items: list[Item], sources: list[Any]) -> list[list[Item] | Rejected]:
        """Run the stage on a batch; if the batch call fails, isolate the failing items one by one."""
        if not items:
            return []
        try:
            outputs = self.stage.process_batch(items)
            if len(outputs) != len(items):
                raise RuntimeError(f"process_batch returned {len(outputs)} outputs for {len(items)} items")
            return list(outputs)
        except Exception as exc:
            if len(items) > 1:
                self.log.warning("batch failed, retrying items one by one", error=repr(exc)[:300], items=len(items),
                                 **self._policy_version())
            results: list[list[Item] | Rejected] = []
            for item, msg in zip(items, sources, strict=True):
                # Whatever the stage logs while handling this one item names it.
                with structlog.contextvars.bound_contextvars(**record_fields(msg, item)):
                    try:
                        results.append(self.stage.process_batch([item])[0])
                    except Exception as item_exc:
                        self.metrics.inc("sipstream_processing_errors_total")
                        results.append(Rejected("process", f"{type(item_exc).__name__}: {item_exc}"[:2000]))
            return results

    # ------------------------------------------------------------------ helpers

    def _deliver_control(self) -> None:
        """Hand the stage any new control records (non-blocking)."""
        if self.control is None:
            return
        for msg in self.control.consume(num_messages=100, timeout=0):
            if msg.error() is not None:
                continue
            topic = msg.topic().removeprefix(self.cfg.bus.topic_prefix)
            value = decode_record(msg.value(), self.specs[topic], self.cfg.runner.max_record_bytes)
            if isinstance(value, Rejected):
                self.stats.counters["control_invalid"] += 1
                self.log.error("invalid control record ignored", topic=msg.topic(), offset=msg.offset(),
                               error=value.error, reason=value.reason[:300])
                continue
            self.stage.on_control(topic, value)

    def _decode(self, msg: Any) -> Item | Rejected:
        return decode_record(msg.value(), self.input_spec, self.cfg.runner.max_record_bytes)

    def _produce_outputs(self, msg: Any, outputs: list[Item]) -> Rejected | None:
        """Produce a record's outputs, or say why none can be: invalid, or one too large to produce."""
        bad = self._check_outputs(outputs)
        if bad is not None:
            return bad
        topic = self.stage.output_topic
        if topic is None or not outputs:  # no output topic: _check_outputs made sure there are no outputs
            return None
        limit = self.cfg.runner.max_record_bytes
        try:
            encoded = [self._encode(topic, out) for out in outputs]
        except UnicodeEncodeError as exc:
            return Rejected("bad_output", f"output holds a lone surrogate, which is not text: {exc}")
        for index, (key, value) in enumerate(encoded):
            size = len(value) + len(key or b"")
            if size > limit:
                return Rejected("output_too_large", f"output {index + 1} of {len(encoded)} has {size} bytes (key + "
                                f"value), over runner.max_record_bytes={limit}, which the producer takes")
        for key, value in encoded:
            try:
                self._send(topic, key, value, source=msg)
            except KafkaException as exc:
                if exc.args[0].code() not in SIZE_ERRORS:
                    raise
                return Rejected("output_too_large", f"the producer refused an output: {exc.args[0].str()}")
        return None

    def _await_acknowledgements(self) -> int:
        """Sync point: wait for every acknowledgement before committing (at-least-once). An output the broker
        refused for its size (a topic limit under ours) dead-letters its record instead; returns how many."""
        remaining = self.producer.flush(30.0)
        refused, self._refused = self._refused, []
        sources = {(m.topic(), m.partition(), m.offset()): (m, failure) for m, failure in refused}
        for msg, failure in sources.values():
            self.stats.counters["processed"] -= 1
            self._deadletter(msg, failure)
        if sources:
            remaining = self.producer.flush(30.0)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise DeliveryError(
                f"{remaining} record(s) unacknowledged, {len(errors)} failed ({'; '.join(errors[:3])}); "
                "offsets not committed, the batch will be re-delivered on restart"
            )
        return len(refused)

    def _check_outputs(self, outputs: list[Item]) -> Rejected | None:
        if not isinstance(outputs, list):
            return Rejected("bad_output", f"stage returned {type(outputs).__name__}, expected a list of items")
        if outputs and self.output_spec is None:
            return Rejected("bad_output", "stage has no output topic but returned items")
        for out in outputs:
            errors = self.output_spec.errors(out) if self.output_spec else []
            if errors:
                return Rejected("bad_output", f"output violates {self.output_spec.name} schema: " + "; ".join(errors[:5]))  # type: ignore[union-attr]
        return None

    def _on_delivery(self, err: Any, msg: Any, source: Any = None) -> None:
        """`source`: the consumed record an output was made from (None for dead letters and metrics)."""
        if err is None:
            return
        if source is not None and err.code() in SIZE_ERRORS:
            self._refused.append((source, Rejected("output_too_large", f"the broker refused an output: {err.str()}")))
        else:
            self._delivery_errors.append(f"{msg.topic()}: {err.str()}")

    def _encode(self, topic: str, value: Item) -> tuple[bytes | None, bytes]:
        """(key, value) bytes of a record for the topic specified as `topic`; the key is the spec's key field."""
        key = value.get(self.specs[topic].key)
        return None if key is None else str(key).encode("utf-8"), T.encode_value(value)

    def _send(self, topic: str, key: bytes | None, value: bytes, source: Any = None) -> None:
        """Produce to the topic specified as `topic` (its live name carries bus.topic_prefix)."""
        on_delivery = self._on_delivery if source is None else functools.partial(self._on_delivery, source=source)
        while True:
            try:
                self.producer.produce(self.cfg.bus.topic(topic), value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:
                # The local queue is full (the broker is slower than we are): no fault of this record; serve
                # deliveries and retry. Queued records fail after message.timeout.ms, so this ends.
                self.producer.poll(1.0)

    def _produce(self, topic: str, value: Item) -> None:
        """Produce a dead letter or a metrics record."""
        self._send(topic, *self._encode(topic, value))

    def _deadletter(self, msg: Any, failure: Rejected, item: Item | None = None) -> None:
        record = deadletter_from_message(msg, stage=self.stage.name, instance=self.instance_id, error=failure.error,
                                         reason=failure.reason, limit=self.cfg.runner.deadletter_max_value_bytes)
        key, value = self._encode(T.DEADLETTER, record)
        if len(value) > self.cfg.runner.max_record_bytes:
            # Only a huge source key can do this (config keeps the kept bytes in bounds): keep the coordinates,
            # size and sha256, which find the record again, and cut the rest.
            record |= {"value_b64": "", "truncated": True, "reason": record["reason"][:1000],
                       "key": None if record["key"] is None else record["key"][:1000]}
            key, value = self._encode(T.DEADLETTER, record)
        self._send(T.DEADLETTER, key, value)
        self.stats.counters["deadlettered"] += 1
        self.stats.counters[f"deadlettered.{failure.error}"] += 1
        self.metrics.inc("sipstream_records_deadlettered_total", topic=msg.topic(), error=failure.error)
        self.log.warning("record dead-lettered", error=failure.error, reason=failure.reason[:300],
                         **record_fields(msg, item))

    def _log_processed(self, msg: Any, item: Item, outputs: list[Item]) -> None:
        """One debug event per record (`logging.level=debug`): where it was, which item, what came out."""
        if not self._log_records:
            return
        fields = record_fields(msg, item)
        if "policy_version" not in fields:
            fields |= self._policy_version()
        item_ids = [o["item_id"] for o in outputs if "item_id" in o]
        if item_ids and "item_id" not in fields:  # split: a document became these items
            fields["item_ids"] = item_ids[:20]
        self.log.debug("record processed", outputs=len(outputs), **fields)

    def _policy_version(self) -> dict[str, int]:
        """The policy version the stage holds (rollout), for its events."""
        version = getattr(self.stage, "policy_version", None)
        return {} if version is None else {"policy_version": version}

    def _before_batch(self) -> None:
        """The stage's between-batches hook; a weights load it does is timed for /metrics."""
        before = self._policy_version()
        started = time.perf_counter()
        self.stage.before_batch()
        if self._policy_version() != before:
            self.metrics.set("sipstream_model_load_seconds", time.perf_counter() - started)
            self._observe_stage()

    def _observe_stage(self) -> None:
        """Copy the stage's own counters and policy version into /metrics (main thread: no races)."""
        for name, total in self.stage.stage_counters().items():
            if name == "policy_version":
                self.metrics.set("sipstream_policy_version", total)
            else:
                self.metrics.sync_total("sipstream_stage_events_total", total, event=name)

    def _commit(self, records: list[Any]) -> None:

        next_offsets: dict[tuple[str, int], int] = {}
        for msg in records:
            tp = (msg.topic(), msg.partition())
            next_offsets[tp] = max(next_offsets.get(tp, 0), msg.offset() + 1)
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()], asynchronous=False
        )

    def metrics_record(self) -> Item:
        now = time.time()
        c = self.stats.counters
        elapsed = max(now - self.stats.started, 1e-9)
        return {
            "source": self.stage.name,
            "instance": self.instance_id,
            "ts": now,
            "interval_s": self.cfg.runner.metrics_interval_s,
            "counters": {
                **{k: float(v) for k, v in sorted(c.items())},
                **{f"stage.{k}": float(v) for k, v in sorted(self.stage.stage_counters().items())},
            },
            "gauges": {
                "records_per_s": c["consumed"] / elapsed,
                "uptime_s": elapsed,
            },
        }

    def _maybe_publish_metrics(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_metrics < self.cfg.runner.metrics_interval_s:
            return
        self._last_metrics = time.monotonic()
        self._produce(T.METRICS, self.metrics_record())
        self.producer.poll(0)

    def _shutdown(self) -> None:
        """Flush what is in flight, publish final metrics, leave the group. Runs on every exit path."""
        self.health.close()
        try:
            self._maybe_publish_metrics(force=True)
            self.producer.flush(10.0)
        except Exception as exc:
            self.log.warning("final flush failed", error=repr(exc))
        finally:
            self.consumer.close()  # leaves the group so partitions move on at once
            if self.control is not None:
                self.control.close()
            self.stage.close()
            self.log.info("stage stopped", **{k: v for k, v in self.stats.counters.items() if "." not in k})
