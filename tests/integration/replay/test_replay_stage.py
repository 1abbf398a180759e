"""`replay stage` and the pipeline manifest on the real embedded broker (the model-free echo stage)."""

from __future__ import annotations

import json

from sipstream.bus import topics as T
from sipstream.config import merged
from sipstream.manifest import pipeline_manifest, topic_positions
from sipstream.replay import replay_stage


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
