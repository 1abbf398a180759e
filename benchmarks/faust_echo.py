"""The echo stage as a faust agent: the other side of the comparison in issue 3 (faust vs poll loop).

Does the same work as `sipstream worker echo` (sipstream/bus/runner.py + sipstream/stages/echo.py):

    take a batch (stream.take_events) → off the event loop: decode, schema-validate, "model call"
    (a sleep), validate output → produce outputs / dead letters → await every acknowledgement
    → let take_events ack the batch's events → faust commits acked offsets

Delivery guarantee aimed at: **at-least-once**. `take_events` acks a batch's events only when the
agent body asks for the next batch, i.e. after our sends were awaited; faust commits acked offsets
every `broker_commit_interval` seconds, on shutdown (after flushing its producer) and — in
principle — every `broker_commit_every` acks (see `commit_per_batch` for why that rarely fires);
`--commit-per-batch` acks and commits explicitly after each batch, as the runner does.
`take_events` is `take` that yields events instead of values: a dead letter needs the source offset.

Run: python -m benchmarks.faust_echo --bootstrap 127.0.0.1:PORT --topic-prefix P --group-prefix G
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sipstream.bus import topics as T


@dataclass
class Settings:
    bootstrap: str
    topic_prefix: str = ""
    group_prefix: str = "sipstream"
    batch_size: int = 16
    within_s: float = 0.5
    delay_s: float = 0.0
    session_timeout_s: float = 6.0
    commit_every: int | None = None  # None: commit after every batch (batch_size acks), like the runner
    commit_interval_s: float = 2.8
    producer_linger_s: float = 0.005  # as the runner's producer (linger.ms=5); faust's default 0 was ~35% slower here
    commit_per_batch: bool = False  # ack + commit explicitly after each batch's sends are acknowledged
    max_record_bytes: int = 10 * 1024 * 1024
    deadletter_max_value_bytes: int = 256 * 1024
    instance: str = ""


@dataclass
class Outcome:
    """What the off-loop work decided for one record: an output value, or a dead-letter reason."""

    value: bytes | None = None
    error: str | None = None
    reason: str = ""


def _echo_one(raw: bytes | None, settings: Settings, in_spec: T.TopicSpec, out_spec: T.TopicSpec) -> Outcome:
    """Decode + validate + 'model call' + validate output: the runner's _decode/_process/_check_outputs."""
    if raw is None:
        return Outcome(error="bad_json", reason="empty value (tombstone)")
    if len(raw) > settings.max_record_bytes:
        return Outcome(error="too_large", reason=f"value has {len(raw)} bytes")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Outcome(error="bad_encoding", reason=f"value is not UTF-8: {exc}")
    except json.JSONDecodeError as exc:
        return Outcome(error="bad_json", reason=f"value is not JSON: {exc}")
    errors = in_spec.errors(value)
    if errors:
        return Outcome(error="schema", reason=f"violates {in_spec.name} schema: " + "; ".join(errors[:5]))
    if settings.delay_s:
        time.sleep(settings.delay_s)  # stands in for model time, as EchoStage does
    out = {**value, "echoed_by": settings.instance}
    errors = out_spec.errors(out)
    if errors:
        return Outcome(error="bad_output", reason="; ".join(errors[:5]))
    return Outcome(value=T.encode_value(out))


def build_app(settings: Settings) -> Any:
    import faust

    specs = T.load_specs()
    in_spec, out_spec = specs[T.DOCUMENTS], specs[T.ECHO]
    settings.instance = settings.instance or f"echo-faust-{socket.gethostname()}-{os.getpid()}"
    app = faust.App(
        f"{settings.group_prefix}.echo",  # the consumer group, named as the runner names it
        broker=f"kafka://{settings.bootstrap}",
        store="memory://",
        # A group join waits about half the session timeout on the embedded broker (docs/embedded-broker.md).
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.1, settings.session_timeout_s / 10),
        broker_commit_every=settings.commit_every or settings.batch_size,
        broker_commit_interval=settings.commit_interval_s,
        # On shutdown wait for in-flight events to be acked, then commit (the default, made explicit).
        stream_wait_empty=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,  # acks=all, as the runner's idempotent producer
        producer_linger=settings.producer_linger_s,
        topic_disable_leader=True,  # no APPNAME-__assignor-__leader topic; we have no tables
        topic_allow_declare=False,  # topics come from topics/ specs, created by the caller
        web_enabled=False,  # no HTTP port: several workers share a machine in the benchmark
    )
    documents = app.topic(
        f"{settings.topic_prefix}{T.DOCUMENTS}",
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=in_spec.partitions,
    )
    echo_topic = app.topic(f"{settings.topic_prefix}{T.ECHO}", key_serializer="raw", value_serializer="raw")
    deadletter = app.topic(f"{settings.topic_prefix}{T.DEADLETTER}", key_serializer="raw", value_serializer="raw")
    # One thread, as the runner processes one batch at a time: model calls never block the event loop,
    # so heartbeats, fetches and acks keep flowing while a batch is in the model.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    counters = {"consumed": 0, "processed": 0, "deadlettered": 0}

    def process_batch(raws: list[bytes | None]) -> list[Outcome]:
        return [_echo_one(raw, settings, in_spec, out_spec) for raw in raws]

    def deadletter_value(event: Any, outcome: Outcome) -> bytes:
        msg = event.message
        raw: bytes = msg.value or b""
        limit = settings.deadletter_max_value_bytes
        key = msg.key
        return T.encode_value({
            "stage": "echo", "instance": settings.instance, "error": outcome.error, "reason": outcome.reason[:2000],
            "topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
            "key": None if key is None else key.decode("utf-8", errors="replace"),
            "value_b64": base64.b64encode(raw[:limit]).decode("ascii"), "value_bytes": len(raw),
            "value_sha256": hashlib.sha256(raw).hexdigest(), "truncated": len(raw) > limit, "ts": time.time(),
        })

    @app.agent(documents)
    async def echo(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(settings.batch_size, within=settings.within_s):
            counters["consumed"] += len(events)
            outcomes = await loop.run_in_executor(executor, process_batch, [e.message.value for e in events])
            pending = []
            for event, outcome in zip(events, outcomes, strict=True):
                if outcome.value is not None:
                    pending.append(await echo_topic.send(key=event.message.key, value=outcome.value))
                    counters["processed"] += 1
                else:
                    pending.append(await deadletter.send(key=b"echo", value=deadletter_value(event, outcome)))
                    counters["deadlettered"] += 1
            # Sync point: every output acknowledged by the broker before take_events acks the events.
            try:
                await asyncio.gather(*pending)
            except Exception as exc:
                # take_events acks its buffered events in a `finally`, even when the body raised, and
                # faust would then commit them: a failed send would lose the batch. Exit without
                # committing instead, so the batch is re-delivered (at-least-once).
                print(f"faust echo: produce failed, exiting without commit: {exc!r}", file=sys.stderr, flush=True)
                os._exit(70)
            if settings.commit_per_batch:
                # faust's own commit triggers are a timer (broker_commit_interval) and an ack count that
                # is only checked when the fetcher hands over a *new* message — with a full stream
                # buffer that never happens, so acked work waits for the timer. Ack now (take_events'
                # later ack of the same events is then a no-op) and commit, as the runner does.
                for event in events:
                    event.ack()
                await app.consumer.commit()

    app.sip_counters = counters  # type: ignore[attr-defined]
    app.sip_executor = executor  # type: ignore[attr-defined]
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--group-prefix", default="sipstream")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--within", type=float, default=0.5, help="longest wait to fill a batch (s)")
    p.add_argument("--delay-s", type=float, default=0.0, help="sleep per record standing in for model time")
    p.add_argument("--commit-every", type=int, default=None)
    p.add_argument("--commit-interval", type=float, default=2.8)
    p.add_argument("--linger", type=float, default=0.005, help="producer linger (s)")
    p.add_argument("--commit-per-batch", action="store_true", help="ack + commit after every batch")
    p.add_argument("--loglevel", default="warning")
    args = p.parse_args(argv)
    settings = Settings(
        bootstrap=args.bootstrap, topic_prefix=args.topic_prefix, group_prefix=args.group_prefix,
        batch_size=args.batch_size, within_s=args.within, delay_s=args.delay_s,
        commit_every=args.commit_every, commit_interval_s=args.commit_interval,
        commit_per_batch=args.commit_per_batch, producer_linger_s=args.linger,
    )
    app = build_app(settings)

    import faust

    # faust.Worker installs SIGINT/SIGTERM handlers that stop the app (agents, then the consumer:
    # wait for unacked events, flush the producer, commit) and exit.
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True, redirect_stdouts=False)

    try:
        worker.execute_from_commandline()  # runs until a signal; exits the process via SystemExit
    finally:
        print(f"faust echo stopped {json.dumps(app.sip_counters)}", file=sys.stderr, flush=True)

if __name__ == "__main__":
    main()
