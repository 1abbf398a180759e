"""`replay stage` and the pipeline manifest on the real embedded broker (the model-free echo stage)."""

from __future__ import annotations

import json

from sipstream.bus import topics as T
from sipstream.config import merged
from sipstream.ops.manifest import pipeline_manifest
from sipstream.replay.run import replay_stage
from sipstream.runs.manifest import topic_positions


def test_pipeline_manifest_records_this_runs_range_and_a_stage_replays_it_into_new_topics(bus, docs, tmp_path) -> None:
    cfg = merged(bus.cfg, run_dir=str(tmp_path / "runs"))
    bus.produce(T.DOCUMENTS, docs(3, tag="before"))  # an earlier run's records on the same topics
    begin = topic_positions(bus.bootstrap, cfg.bus, [T.DOCUMENTS, T.ECHO])
    bus.produce(T.DOCUMENTS, docs(10))
    run_dir = tmp_path / "runs" / "pipeline-run"
    manifest = pipeline_manifest(run_dir, cfg, bus.bootstrap, begin, topics=[T.DOCUMENTS, T.ECHO])
    assert json.loads((run_dir / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["kind"] == "pipeline" and manifest["topics"][T.DOCUMENTS]["records"] == 10
    assert manifest["topics"][T.ECHO]["records"] == 0 and manifest["learner_run"] is None

    result = replay_stage("echo", run_dir, timeout_s=120)
    assert (result.input_records, result.output_records, result.deadlettered) == (10, 10, 0)
    assert result.topic_prefix.startswith("replay-") and result.topic_prefix.endswith(cfg.bus.topic_prefix)
    replayed = json.loads((result.run_dir / "manifest.json").read_text())
    assert replayed["kind"] == "stage-replay" and replayed["topics"][T.ECHO]["live_name"] == result.topic_prefix + T.ECHO
    # The original topics are untouched: no echo output there, the documents as they were.
    assert bus.read(T.ECHO) == [] and len(bus.read(T.DOCUMENTS)) == 13
    echoed = sorted(json.loads(v)["doc_id"] for v in _values(bus.bootstrap, result.topic_prefix + T.ECHO, 10))
    assert echoed == sorted(d["doc_id"] for d in docs(10))


def _values(bootstrap: str, topic: str, expect: int) -> list[bytes]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "replay-test", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(T.load_specs()[T.ECHO].partitions)])
    out: list[bytes] = []
    try:
        for _ in range(100):
            out += [m.value() for m in consumer.consume(100, timeout=0.2) if m.error() is None]
            if len(out) >= expect:
                break
    finally:
        consumer.close()
    return out


def _replay_topics(bootstrap: str, prefix: str) -> list[str]:
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return [t for t in topics if t.startswith("replay-") and f".{prefix}" in t]


def test_a_missing_input_topic_is_said_plainly_before_any_replay_topic_is_made(bus, docs, tmp_path) -> None:
    import time

    import pytest

    from sipstream.errors import UserError

    cfg = merged(bus.cfg, run_dir=str(tmp_path / "runs"))
    bus.produce(T.DOCUMENTS, docs(2))
    run_dir = tmp_path / "runs" / "gone"
    pipeline_manifest(run_dir, cfg, bus.bootstrap, topics=[T.DOCUMENTS])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["topics"][T.DOCUMENTS]["live_name"] = "deleted." + T.DOCUMENTS  # e.g. the topic was deleted
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    started = time.monotonic()
    with pytest.raises(UserError, match=f"topic deleted.{T.DOCUMENTS} does not exist on {bus.bootstrap}"):
        replay_stage("echo", run_dir, timeout_s=60)
    assert time.monotonic() - started < 15  # not the fetcher's 30 s wait
    assert _replay_topics(bus.bootstrap, cfg.bus.topic_prefix) == []

    with pytest.raises(UserError, match="unknown stage 'nope'"):
        replay_stage("nope", run_dir)


def test_a_run_whose_in_memory_broker_is_gone_replays_a_stage_from_its_archive(bus, docs, tmp_path) -> None:
    """What `sipstream run` leaves: a manifest marked ephemeral, every topic exported to RUN_DIR/export/, a
    broker address nobody answers at. The replay puts the input back on a broker of its own (or the one
    it is given) and archives what it wrote."""
    import pytest

    from sipstream.errors import UserError
    from sipstream.replay.export import export_topic

    cfg = merged(bus.cfg, run_dir=str(tmp_path / "runs"))
    bus.produce(T.DOCUMENTS, docs(6))
    run_dir = tmp_path / "runs" / "memory-run"
    pipeline_manifest(run_dir, cfg, bus.bootstrap, topics=[T.DOCUMENTS, T.ECHO], ephemeral=True, archive="export")
    export_topic(T.DOCUMENTS, run_dir, str(run_dir / "export"), bootstrap=bus.bootstrap)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["bus"]["bootstrap_servers"] = manifest["config"]["bus"]["bootstrap_servers"] = "127.0.0.1:1"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    alone = replay_stage("echo", run_dir, timeout_s=120)  # on an embedded broker started for it
    assert (alone.input_records, alone.output_records, alone.deadlettered) == (6, 6, 0)
    replayed = json.loads((alone.run_dir / "manifest.json").read_text())
    assert replayed["replay_of"]["from_archive"] == str((run_dir / "export").resolve())
    assert replayed["bus"]["ephemeral"] and alone.archive == alone.run_dir / "export"
    echoed = [json.loads(line) for p in sorted((alone.archive / T.ECHO).glob("*.jsonl"))
              for line in p.read_text().splitlines()]
    assert sorted(json.loads(r["value"])["doc_id"] for r in echoed) == sorted(d["doc_id"] for d in docs(6))

    given = replay_stage("echo", run_dir, bootstrap=bus.bootstrap, timeout_s=120)  # on the broker given
    assert (given.input_records, given.output_records) == (6, 6) and given.archive is None
    assert len(_values(bus.bootstrap, given.topic_prefix + T.ECHO, 6)) == 6
    assert bus.read(T.ECHO) == []  # the original topics are untouched

    (run_dir / "export" / "export.json").write_text(json.dumps({"topics": {}}))  # an archive from before
    with pytest.raises(UserError, match=f"in-memory broker that ended with it.*holds no {T.DOCUMENTS}"):
        replay_stage("echo", run_dir)
