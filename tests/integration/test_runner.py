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

    def process(self, item):  # noqa: ANN001, ANN201
        if item["text"] == "explode":
            raise ValueError("cannot handle this document")
        if item["text"] == "bad-output":
            return [{"doc_id": item["doc_id"]}]  # misses fields sip.echo requires
        return super().process(item)


def test_topics_created_from_specs_idempotently(bus) -> None:  # noqa: ANN001
    specs = T.load_specs()
    assert set(T.create_topics(bus.cfg.bus, bus.bootstrap, specs).values()) == {"exists"}
    states = T.describe_topics(bus.cfg.bus, bus.bootstrap, specs)
    assert all(s.ok for s in states), [s for s in states if not s.ok]
    live = T.list_topics(bus.cfg.bus, bus.bootstrap)
    assert live[bus.topic(T.DOCUMENTS)] == specs[T.DOCUMENTS].partitions
    assert states[0].configs.get("retention.ms") == str(specs[states[0].name.removeprefix(bus.cfg.bus.topic_prefix)].retention_ms)


def test_describe_reports_a_topic_that_differs_from_its_spec(bus) -> None:  # noqa: ANN001
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


def test_records_round_trip_through_the_runner(bus, docs) -> None:  # noqa: ANN001
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


def test_bad_records_go_to_deadletter_and_the_stream_continues(bus, docs) -> None:  # noqa: ANN001
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


def test_oversized_record_is_deadlettered_with_a_cut_copy(bus) -> None:  # noqa: ANN001
    from sipstream.config import merged

    cfg = merged(bus.cfg, runner={"max_record_bytes": 4096, "deadletter_max_value_bytes": 1024})
    huge = {"doc_id": "huge", "text": "x" * 10_000, "source": "t"}
    bus.produce(T.DOCUMENTS, [huge, {"doc_id": "small", "text": "ok", "source": "t"}], key="k")
    stats = StageRunner(EchoStage(), cfg, bus.bootstrap).run(until=lambda s: s.counters["consumed"] >= 2)
    assert stats.counters["processed"] == 1
    (dead,) = bus.values(T.DEADLETTER, expect=1)
    assert dead["error"] == "too_large" and dead["truncated"] and dead["value_bytes"] > 10_000
    assert len(base64.b64decode(dead["value_b64"])) == 1024


def test_stop_finishes_the_batch_and_commits(bus, docs) -> None:  # noqa: ANN001
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


def test_missing_input_topic_is_a_user_error(broker) -> None:  # noqa: ANN001
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
