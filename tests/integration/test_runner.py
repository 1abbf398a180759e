"""The stage runner against the real embedded broker: round trip, dead letters, commits, metrics."""

from __future__ import annotations

import base64
import hashlib
import json
import threading

import pytest

from sipstream.bus import topics as T
from sipstream.bus.runner import StageRunner
from sipstream.stages.echo import EchoStage


class PickyStage(EchoStage):
    """Echo that fails on chosen documents, and emits an invalid output for others."""

    def process(self, item):
        if item["text"] == "explode":
            raise ValueError("cannot handle this document")
        if item["text"] == "bad-output":
            return [{"doc_id": item["doc_id"]}]  # misses fields sip.echo requires
        return super().process(item)


def test_topics_created_from_specs_idempotently(bus) -> None:
    specs = T.load_specs()
    assert set(T.create_topics(bus.cfg.bus, bus.bootstrap, specs).values()) == {"exists"}
    states = T.describe_topics(bus.cfg.bus, bus.bootstrap, specs)
    assert all(s.ok for s in states), [s for s in states if not s.ok]
    live = T.list_topics(bus.cfg.bus, bus.bootstrap)
    assert live[bus.topic(T.DOCUMENTS)] == specs[T.DOCUMENTS].partitions
    assert states[0].configs.get("retention.ms") == str(specs[states[0].name.removeprefix(bus.cfg.bus.topic_prefix)].retention_ms)


def test_describe_reports_a_topic_that_differs_from_its_spec(bus) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    from sipstream.config import merged

    other = merged(bus.cfg, bus={"topic_prefix": bus.cfg.bus.topic_prefix + "x."})
    admin = AdminClient({"bootstrap.servers": bus.bootstrap})
    admin.create_topics([NewTopic(other.bus.topic(T.DOCUMENTS), 2, config={"retention.ms": "1000"})])[
        other.bus.topic(T.DOCUMENTS)
    ].result(10)
    states = {s.name: s for s in T.describe_topics(other.bus, bus.bootstrap, T.load_specs())}
    docs_state = states[other.bus.topic(T.DOCUMENTS)]
    assert "partitions: live 2, spec 4" in docs_state.differences
    assert "retention.ms: live 1000, spec -1" in docs_state.differences
    assert not states[other.bus.topic(T.PAIRS)].exists


def test_records_round_trip_through_the_runner(bus, docs) -> None:
    documents = docs(40)
    bus.produce(T.DOCUMENTS, documents)
    runner = StageRunner(EchoStage(instance="w1"), bus.cfg, bus.bootstrap)
    stats = runner.run(until=lambda s: s.counters["consumed"] >= 40)
    assert stats.counters["processed"] == 40 and stats.counters["deadlettered"] == 0

    echoed = bus.values(T.ECHO, expect=40)
    assert sorted(v["doc_id"] for v in echoed) == [d["doc_id"] for d in documents]
    assert all(v["echoed_by"] == "w1" and v["text"].startswith("document") for v in echoed)

    # Offsets were committed: a new runner in the same group finds nothing left to do.
    again = StageRunner(EchoStage(), bus.cfg, bus.bootstrap).run(max_batches=1, until=lambda s: True)
    assert again.counters["consumed"] == 0

    metrics = bus.values(T.METRICS)
    assert any(m["source"] == "echo" and m["counters"].get("processed") == 40 for m in metrics)


def test_bad_records_go_to_deadletter_and_the_stream_continues(bus, docs) -> None:
    before, after = docs(5, "a"), docs(5, "z")
    bad = [
        b"{not json",
        json.dumps({"doc_id": 42, "text": "x"}).encode(),  # schema: wrong type, missing source
        b"\xff\xfe invalid utf-8",
        {"doc_id": "boom", "text": "explode", "source": "t"},
        {"doc_id": "badout", "text": "bad-output", "source": "t"},
    ]
    # One partition (same key) so the order before → bad → after is fixed.
    for value in [*before, *bad, *after]:
        bus.produce(T.DOCUMENTS, [value], key="same-partition")
    runner = StageRunner(PickyStage(), bus.cfg, bus.bootstrap)
    stats = runner.run(until=lambda s: s.counters["consumed"] >= 15)

    assert stats.counters["processed"] == 10
    assert sorted(v["doc_id"] for v in bus.values(T.ECHO, expect=10)) == sorted(d["doc_id"] for d in before + after)

    dead = bus.values(T.DEADLETTER, expect=5)
    assert sorted(d["error"] for d in dead) == ["bad_encoding", "bad_json", "bad_output", "process", "schema"]
    by_error = {d["error"]: d for d in dead}
    assert "cannot handle this document" in by_error["process"]["reason"]
    assert "doc_id: 42 is not of type 'string'" in by_error["schema"]["reason"]
    assert "sip.echo schema" in by_error["bad_output"]["reason"]
    for d in dead:
        original = base64.b64decode(d["value_b64"])
        assert hashlib.sha256(original).hexdigest() == d["value_sha256"]  # the original bytes, whole
        assert d["topic"] == bus.topic(T.DOCUMENTS) and d["stage"] == "echo" and not d["truncated"]
        assert d["offset"] >= 5
    assert base64.b64decode(by_error["bad_encoding"]["value_b64"]) == b"\xff\xfe invalid utf-8"
    assert [d["offset"] for d in sorted(dead, key=lambda d: d["offset"])] == [5, 6, 7, 8, 9]


def test_oversized_record_is_deadlettered_with_a_cut_copy(bus) -> None:
    from sipstream.config import merged

    cfg = merged(bus.cfg, runner={"max_record_bytes": 4096, "deadletter_max_value_bytes": 1024})
    huge = {"doc_id": "huge", "text": "x" * 10_000, "source": "t"}
    bus.produce(T.DOCUMENTS, [huge, {"doc_id": "small", "text": "ok", "source": "t"}], key="k")
    stats = StageRunner(EchoStage(), cfg, bus.bootstrap).run(until=lambda s: s.counters["consumed"] >= 2)
    assert stats.counters["processed"] == 1
    (dead,) = bus.values(T.DEADLETTER, expect=1)
    assert dead["error"] == "too_large" and dead["truncated"] and dead["value_bytes"] > 10_000
    assert len(base64.b64decode(dead["value_b64"])) == 1024


def test_stop_finishes_the_batch_and_commits(bus, docs) -> None:
    bus.produce(T.DOCUMENTS, docs(200))
    runner = StageRunner(EchoStage(delay_s=0.01), bus.cfg, bus.bootstrap)
    timer = threading.Timer(4.0, runner.stop)  # group join takes ~3 s, then ~0.1 s per batch
    timer.start()
    first = runner.run()
    timer.cancel()
    done = first.counters["processed"]
    assert 0 < done < 200, "stop() should interrupt the stream mid-way"
    # The batch in hand was finished and committed: a successor resumes exactly after it.
    second = StageRunner(EchoStage(), bus.cfg, bus.bootstrap).run(until=lambda s: s.counters["consumed"] >= 200 - done)
    assert first.counters["consumed"] + second.counters["consumed"] == 200
    echoed = [v["doc_id"] for v in bus.values(T.ECHO, expect=200)]
    assert len(echoed) == 200 and len(set(echoed)) == 200


def test_missing_input_topic_is_a_user_error(broker) -> None:
    from sipstream.config import load_config
    from sipstream.errors import UserError

    cfg = load_config(
        overrides=[f"bus.bootstrap_servers={broker.bootstrap_servers}", "bus.topic_prefix=never-created.",
                   "runner.batch_timeout_s=0.2"],
        env={},
    )
    runner = StageRunner(EchoStage(), cfg, broker.bootstrap_servers)
    with pytest.raises(UserError, match="does not exist"):
        runner.run(max_batches=50)


def _produce_as_outside_client(bus, values: list[dict], key: str) -> None:
    """Produce as a client that allows 16 MiB records would (the embedded broker accepts them)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bus.bootstrap, "message.max.bytes": 16 * 1024 * 1024})
    for value in values:
        producer.produce(bus.topic(T.DOCUMENTS), value=json.dumps(value).encode(), key=key.encode())
    assert producer.flush(30) == 0


def test_a_record_whose_output_cannot_be_produced_is_dead_lettered_and_the_next_flows(bus) -> None:
    """Issue 18 defect 1: a schema-valid 5.2 MB record (and one just under the input limit whose output is over it)
    once killed the worker in produce with MSG_SIZE_TOO_LARGE, uncommitted, on every restart."""
    limit = bus.cfg.runner.max_record_bytes
    poison = {"doc_id": "poison", "text": "p" * 5_200_000, "source": "t"}
    near = {"doc_id": "near", "text": "", "source": "t"}
    near["text"] = "n" * (limit - len(json.dumps(near).encode()))  # the input fits the limit exactly; echo adds a field
    after = {"doc_id": "after", "text": "ok", "source": "t"}
    _produce_as_outside_client(bus, [poison, near, after], key="same-partition")

    stats = StageRunner(EchoStage(), bus.cfg, bus.bootstrap).run(until=lambda s: s.counters["consumed"] >= 3)

    assert stats.counters["processed"] == 1
    assert [v["doc_id"] for v in bus.values(T.ECHO, expect=1)] == ["after"]
    dead = sorted(bus.values(T.DEADLETTER, expect=2), key=lambda d: d["offset"])
    assert [d["error"] for d in dead] == ["too_large", "output_too_large"]
    assert "runner.max_record_bytes" in dead[1]["reason"] and dead[1]["value_bytes"] == limit
    assert all(d["truncated"] for d in dead)  # cut at runner.deadletter_max_value_bytes, so the dead letter fits
    # Committed: a restarted worker does not meet the poison again.
    again = StageRunner(EchoStage(), bus.cfg, bus.bootstrap).run(max_batches=1, until=lambda s: True)
    assert again.counters["consumed"] == 0


def test_a_raised_record_limit_reaches_the_producer(bus) -> None:
    """One value, runner.max_record_bytes, sets the input limit, the output limit and the producer's
    message.max.bytes: raised to 8 MiB, the 5.2 MB record is echoed."""
    from sipstream.config import merged

    cfg = merged(bus.cfg, runner={"max_record_bytes": 8 * 1024 * 1024})
    _produce_as_outside_client(bus, [{"doc_id": "big", "text": "b" * 5_200_000, "source": "t"}], key="k")
    stats = StageRunner(EchoStage(), cfg, bus.bootstrap).run(until=lambda s: s.counters["consumed"] >= 1)
    assert stats.counters["processed"] == 1 and stats.counters["deadlettered"] == 0
    (echoed,) = bus.values(T.ECHO, expect=1)
    assert len(echoed["text"]) == 5_200_000


class ControlledEcho(EchoStage):
    """Echo that also follows sip.weights and records what it is handed."""

    control_topics = (T.WEIGHTS,)

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[dict] = []

    def on_control(self, topic, value):
        self.handed.append(value)


def test_control_records_are_decoded_by_the_one_decode_path(bus) -> None:
    """A control record that is not JSON, not UTF-8 or off its schema is counted and ignored, never handed on."""
    valid = {"run_name": "r", "version": 1, "uri": "file:///w.safetensors", "sha256": "a" * 64, "step": 1,
             "created_at": "2026-12-02T12:00:00Z"}
    bus.produce(T.WEIGHTS, [b"{not json", b"\xff\xfe", {**valid, "version": "1"}, valid], key="r")
    bus.produce(T.DOCUMENTS, [{"doc_id": "d", "text": "x", "source": "t"}])
    stage = ControlledEcho()
    runner = StageRunner(stage, bus.cfg, bus.bootstrap)
    runner.run(until=lambda s: s.counters["consumed"] >= 1 and len(stage.handed) + s.counters["control_invalid"] >= 4)
    assert stage.handed == [valid] and runner.stats.counters["control_invalid"] == 3


def test_an_output_the_broker_refuses_for_its_size_dead_letters_its_record(bus) -> None:
    """A cluster whose topic limit is under runner.max_record_bytes refuses the output in its delivery report.
    The embedded broker enforces no size limit, so the report librdkafka would deliver is handed to the runner's
    delivery callback: the source record is dead-lettered (output_too_large), the batch is not failed."""
    from confluent_kafka import KafkaError

    bus.produce(T.DOCUMENTS, [{"doc_id": "refused", "text": "x", "source": "t"}])
    (source,) = bus.read(T.DOCUMENTS, expect=1)
    runner = StageRunner(EchoStage(), bus.cfg, bus.bootstrap)
    try:
        runner.stats.counters["processed"] += 1  # as _handle_batch counted it before the report came
        runner._on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None, source=source)
        assert runner._await_acknowledgements() == 1
    finally:
        runner._shutdown()
    (dead,) = bus.values(T.DEADLETTER, expect=1)
    assert dead["error"] == "output_too_large" and "broker refused" in dead["reason"] and dead["offset"] == source.offset()
    assert runner.stats.counters["processed"] == 0 and runner.stats.counters["deadlettered"] == 1
