"""Broker: records/s and end-to-end latency through the runner vs raw confluent-kafka, same broker.

- **raw produce / raw consume**: a confluent-kafka Producer writes N documents (flush at the end), a
  Consumer reads them back (assigned partitions, no group): what the embedded broker itself does.
- **echo throughput**: N documents already on the topic are copied to `sip.echo`, by the real runner
  (`StageRunner` + the echo stage: decode, schema-validate, process, validate, produce, wait for acks,
  commit) and by a raw loop doing only the transport (consume, produce the same bytes, flush, commit).
  Both use the project's client settings (idempotent producer, acks=all, linger 5 ms, manual commits)
  and the same batch size and timeout, so the ratio is what the runner's own work costs.
- **latency**: documents produced at a steady rate, each stamped with its send time; a reader on
  `sip.echo` takes receipt time minus send time (p50/p95/p99), through the runner and the raw loop.

Everything runs in this process (runner and raw loop in a thread, producer and reader in others), so
both sides pay the same GIL and scheduling costs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.context import Context
from benchmarks.measure import Section, percentile

TITLE = "Broker: runner vs raw confluent-kafka on the embedded broker"
BATCH, BATCH_TIMEOUT_S = 100, 0.1  # throughput: big batches
LATENCY_BATCH, LATENCY_TIMEOUT_S = 16, 0.02  # latency: small batches, short waits


def documents(n: int, tag: str, stamp: bool = False) -> list[dict]:
    return [{"doc_id": f"{tag}{i:06d}", "text": f"document {i}: " + "lorem ipsum " * 8, "source": "bench"}
            for i in range(n)]


def produce_all(cfg: Any, bootstrap: str, docs: list[dict]) -> float:
    """Produce and flush; seconds."""
    from confluent_kafka import Producer

    from sipstream.bus import topics as T
    from sipstream.bus.client import producer_config

    producer = Producer(producer_config(cfg.bus, bootstrap, client_id="bench-raw-producer"))
    topic = cfg.bus.topic(T.ECHO)
    # Unmeasured first record: connecting and the idempotent producer's id request take ~1 s here.
    producer.produce(topic, value=b"{}")
    producer.flush(30)
    topic = cfg.bus.topic(T.DOCUMENTS)
    payloads = [(doc["doc_id"].encode(), json.dumps(doc).encode()) for doc in docs]
    started = time.perf_counter()
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.01)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("raw producer: records unacknowledged after 60 s")
    return time.perf_counter() - started


def consume_all(cfg: Any, bootstrap: str, topic_name: str, n: int, timeout_s: float = 120) -> float:
    """Read n records from offset 0 of every partition (assign, no group); seconds from the assign."""
    from confluent_kafka import Consumer, TopicPartition

    from sipstream.bus import topics as T

    partitions = T.load_specs(T.topics_dir(cfg.bus))[topic_name].partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-raw-reader", "enable.auto.commit": False})
    first = time.perf_counter()
    consumer.assign([TopicPartition(cfg.bus.topic(topic_name), p, 0) for p in range(partitions)])
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < n and time.monotonic() < deadline:
            seen += len([m for m in consumer.consume(1000, timeout=0.2) if m.error() is None])
    finally:
        consumer.close()
    if seen < n:
        raise RuntimeError(f"raw consumer read {seen}/{n} records within {timeout_s:.0f}s")
    return time.perf_counter() - first


class RawEcho:
    """The transport alone: consume a batch, produce the same bytes to sip.echo, flush, commit."""

    def __init__(self, cfg: Any, bootstrap: str, batch: int, timeout_s: float) -> None:
        from confluent_kafka import Consumer, Producer

        from sipstream.bus import topics as T
        from sipstream.bus.client import consumer_config, producer_config

        self.batch, self.timeout_s = batch, timeout_s
        self.source, self.target = cfg.bus.topic(T.DOCUMENTS), cfg.bus.topic(T.ECHO)
        self.producer = Producer(producer_config(cfg.bus, bootstrap, client_id="bench-raw-echo"))
        self.consumer = Consumer(consumer_config(cfg.bus, bootstrap, group_id=f"{cfg.bus.group_prefix}.raw-echo",
                                                 client_id="bench-raw-echo"))
        self.done = 0
        self.first: float | None = None
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def run(self, until: Callable[[int], bool] | None = None) -> None:
        from confluent_kafka import TopicPartition

        self.consumer.subscribe([self.source])
        try:
            while not self._stopping:
                records = [m for m in self.consumer.consume(self.batch, timeout=self.timeout_s) if m.error() is None]
                self.producer.poll(0)
                if not records:
                    continue
                if self.first is None:
                    self.first = time.perf_counter()
                for msg in records:
                    self.producer.produce(self.target, value=msg.value(), key=msg.key())
                if self.producer.flush(30) != 0:
                    raise RuntimeError("raw echo: records unacknowledged")
                offsets: dict[tuple[str, int], int] = {}
                for msg in records:
                    offsets[(msg.topic(), msg.partition())] = max(offsets.get((msg.topic(), msg.partition()), 0),
                                                                   msg.offset() + 1)
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                     asynchronous=False)
                self.done += len(records)
                if until is not None and until(self.done):
                    break
        finally:
            self.consumer.close()


class RunnerEcho:
    """The real runner with the echo stage; records when its first batch arrived."""

    def __init__(self, cfg: Any, bootstrap: str, batch: int, timeout_s: float) -> None:
        from sipstream.bus.runner import StageRunner
        from sipstream.config import merged
        from sipstream.stages.echo import EchoStage

        outer = self

        class TimedEcho(EchoStage):
            def process_batch(self, items: list[dict]) -> list[list[dict]]:
                if outer.first is None:
                    outer.first = time.perf_counter()
                return super().process_batch(items)

        cfg = merged(cfg, runner={"batch_size": batch, "batch_timeout_s": timeout_s, "metrics_interval_s": 60})
        self.runner = StageRunner(TimedEcho(instance="bench-echo"), cfg, bootstrap, instance_id="bench-echo")
        self.first: float | None = None

    @property
    def done(self) -> int:
        return int(self.runner.stats.counters["processed"])

    def stop(self) -> None:
        self.runner.stop()

    def run(self, until: Callable[[int], bool] | None = None) -> None:
        self.runner.run(until=None if until is None else (lambda stats: until(int(stats.counters["processed"]))))


def echo_throughput(make: Callable[[Any], Any], ctx: Context, n: int) -> float:
    """records/s of an echo worker over n records already on the topic (group join excluded)."""
    cfg = ctx.config()
    produce_all(cfg, ctx.bootstrap, documents(n, "t"))
    worker = make(cfg)
    worker.run(until=lambda done: done >= n)
    assert worker.first is not None
    return n / (time.perf_counter() - worker.first)


class Reader(threading.Thread):
    """Reads sip.echo from offset 0 (assign, no group) and keeps receipt - send time per record."""

    def __init__(self, cfg: Any, bootstrap: str) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, TopicPartition

        from sipstream.bus import topics as T

        partitions = T.load_specs(T.topics_dir(cfg.bus))[T.ECHO].partitions
        # fetch.wait.max.ms: the reader must not add its own batching delay to what it measures.
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-latency-reader",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        self.consumer.assign([TopicPartition(cfg.bus.topic(T.ECHO), p, 0) for p in range(partitions)])
        self.latencies: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for msg in self.consumer.consume(100, timeout=0.05):
                if msg.error() is None:
                    sent = json.loads(msg.value())["meta"]["sent"]
                    self.latencies.append(time.time() - sent)
        self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def echo_latency(make: Callable[[Any], Any], ctx: Context, rate: float, seconds: float) -> list[float]:
    """Latencies (s) of documents produced at `rate`/s for `seconds` through an echo worker."""
    from confluent_kafka import Producer

    from sipstream.bus import topics as T
    from sipstream.bus.client import producer_config

    cfg = ctx.config()
    worker = make(cfg)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    reader = Reader(cfg, ctx.bootstrap)
    reader.start()
    producer = Producer(producer_config(cfg.bus, ctx.bootstrap, client_id="bench-paced-producer"))
    topic = cfg.bus.topic(T.DOCUMENTS)
    try:
        # A first record, unmeasured, waits out the worker's group join.
        producer.produce(topic, value=json.dumps(documents(1, "warm")[0] | {"meta": {"sent": time.time()}}).encode())
        producer.flush(10)
        deadline = time.monotonic() + 60
        while worker.done < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        reader.latencies.clear()
        count = int(rate * seconds)
        started = time.perf_counter()
        for i, doc in enumerate(documents(count, "l")):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            producer.produce(topic, value=json.dumps(doc | {"meta": {"sent": time.time()}}).encode(),
                             key=doc["doc_id"].encode())
            producer.poll(0)
        producer.flush(10)
        deadline = time.monotonic() + 30
        while len(reader.latencies) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
        thread.join(30)
        reader.stop()
    if len(reader.latencies) < count:
        raise RuntimeError(f"latency run: {len(reader.latencies)}/{count} records echoed within 30 s")
    return reader.latencies[:count]


def run(ctx: Context) -> Section:
    n, rate, seconds = (5000, 200, 3.0) if ctx.quick else (20000, 200, 10.0)
    section = Section(TITLE, (
        f"{n:,} small JSON documents (~150 bytes); echo batch {BATCH}, batch timeout {BATCH_TIMEOUT_S} s; latency at "
        f"{rate} records/s for {seconds:.0f} s with batch {LATENCY_BATCH}, timeout {LATENCY_TIMEOUT_S} s; "
        "runner and raw loop each in a thread of this process"))

    cfg = ctx.config()
    produce_s = produce_all(cfg, ctx.bootstrap, documents(n, "p"))
    consume_s = consume_all(cfg, ctx.bootstrap, "sip.documents", n)
    section.metric("raw_produce_per_s", "raw produce records/s", n / produce_s, "records/s")
    section.metric("raw_consume_per_s", "raw consume records/s", n / consume_s, "records/s")

    def raw(batch: int, timeout: float) -> Callable[[Any], RawEcho]:
        return lambda cfg: RawEcho(cfg, ctx.bootstrap, batch, timeout)

    def runner(batch: int, timeout: float) -> Callable[[Any], RunnerEcho]:
        return lambda cfg: RunnerEcho(cfg, ctx.bootstrap, batch, timeout)

    # Interleaved, best of two: a burst of load from other processes then hits both sides.
    raw_rate = max(echo_throughput(raw(BATCH, BATCH_TIMEOUT_S), ctx, n),
                   echo_throughput(raw(BATCH, BATCH_TIMEOUT_S), ctx, n) if not ctx.quick else 0)
    runner_rate = max(echo_throughput(runner(BATCH, BATCH_TIMEOUT_S), ctx, n),
                      echo_throughput(runner(BATCH, BATCH_TIMEOUT_S), ctx, n) if not ctx.quick else 0)
    section.metric("raw_echo_per_s", "raw echo loop records/s", raw_rate, "records/s")
    section.metric("runner_echo_per_s", "runner echo records/s", runner_rate, "records/s")
    section.metric("echo_ratio", "runner / raw echo throughput", runner_rate / raw_rate, "×")

    raw_lat = echo_latency(raw(LATENCY_BATCH, LATENCY_TIMEOUT_S), ctx, rate, seconds)
    runner_lat = echo_latency(runner(LATENCY_BATCH, LATENCY_TIMEOUT_S), ctx, rate, seconds)
    for name, values in (("raw", raw_lat), ("runner", runner_lat)):
        for q in (50, 95, 99):
            section.metric(f"{name}_latency_p{q}_s", f"{name} end-to-end latency p{q}", percentile(values, q), "s")
    section.metric("latency_p50_ratio", "runner / raw latency p50", percentile(runner_lat, 50) / percentile(raw_lat, 50),
                   "×")
    if not ctx.quick:
        # librdkafka's consumer default fetch.wait.max.ms is 500; how much of the latency is that wait?
        def runner_short_fetch(cfg: Any) -> RunnerEcho:
            from sipstream.config import merged

            return RunnerEcho(merged(cfg, bus={"client": {"fetch.wait.max.ms": 5}}), ctx.bootstrap, LATENCY_BATCH,
                              LATENCY_TIMEOUT_S)

        short = echo_latency(runner_short_fetch, ctx, rate, seconds)
        for q in (50, 95, 99):
            section.metric(f"runner_fetch5_latency_p{q}_s", f"runner latency p{q} with fetch.wait.max.ms=5",
                           percentile(short, q), "s")
    per_record_ms = (1 / runner_rate - 1 / raw_rate) * 1000
    section.info["runner cost per record over raw (ms)"] = round(per_record_ms, 3)
    section.notes.append(
        f"The runner's own work (JSON decode, schema validation of input and output, dead-letter checks, metrics) "
        f"costs {per_record_ms:.3f} ms per record over the raw transport loop: nothing next to model calls of "
        "0.1 s to seconds per item. Latency includes the producer's 5 ms linger, one hop through the broker "
        "in, one out, the consumer's batch wait and the synchronous commit before the next batch.")
    return section
