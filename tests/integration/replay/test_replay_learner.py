"""Replay against the real embedded broker: the manifest a learner run writes, a bit-identical replay,
a replay under another algorithm, and export → import into a fresh broker → the same weights."""

from __future__ import annotations

import json
from pathlib import Path

from sipstream.bus import topics as T
from sipstream.replay.run import replay_learner
from sipstream.runs.consumption import read_log


def tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*")}


def test_the_run_writes_a_manifest_and_a_consumption_log(original) -> None:
    cfg, run_dir = original
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "learner" and manifest["status"] == "finished"
    assert manifest["config"]["learner"]["algo"] == "dpo" and manifest["config"]["bus"]["topic_prefix"] == cfg.bus.topic_prefix
    assert manifest["code"]["package"] and manifest["seeds"]["root"] == cfg.seed
    policy = manifest["models"]["policy"]
    assert len(policy["initial_sha256"]) == 64 and len(policy["tokenizer_sha256"]) == 64
    pairs = manifest["topics"][T.PAIRS]
    assert pairs["role"] == "consumed" and pairs["live_name"] == cfg.bus.topic(T.PAIRS) and pairs["records"] == 12
    assert manifest["topics"][T.WEIGHTS]["role"] == "produced" and manifest["topics"][T.WEIGHTS]["records"] == 3
    assert manifest["learner"]["final_weights"]["step"] == 5 and manifest["learner"]["step"] == 5

    entries = read_log(run_dir / "consumption.jsonl")
    assert len(entries) == manifest["learner"]["consumption_log"]["lines"]
    looked_at = [tuple(r) for e in entries for r in e["records"]]
    assert len(looked_at) == len(set(looked_at)) == 12  # every record once: trained, skipped or dead-lettered
    assert sum(len(e["trained"]) for e in entries) == 9 and entries[-1]["step"] == 5
    assert len({p for p, _ in looked_at}) > 1  # spread over partitions: the interleaving matters


def test_replay_gives_bit_identical_weights_and_leaves_the_original_alone(original, broker) -> None:
    _, run_dir = original
    before = tree(run_dir)
    result = replay_learner(run_dir, handle_signals=False)
    assert result.identical, (result.final_sha256, result.original_sha256)
    assert result.steps == 5 and result.records == 12 and result.run_dir.parent == run_dir.parent
    assert tree(run_dir) == before  # checkpoints, weights, manifest untouched

    replayed = json.loads((result.run_dir / "manifest.json").read_text())
    assert replayed["replay_of"]["run_name"] == "orig"
    assert replayed["topics"][T.PAIRS]["partitions"] == json.loads((run_dir / "manifest.json").read_text())["topics"][T.PAIRS]["partitions"]
    # The replay announced on its own topics, never on the original sip.weights.
    assert replayed["topics"][T.WEIGHTS]["live_name"].startswith("replay-")
    assert read_log(result.run_dir / "consumption.jsonl") == read_log(run_dir / "consumption.jsonl")


def test_replay_with_another_algo_trains_on_the_same_pairs(original) -> None:
    _, run_dir = original
    result = replay_learner(run_dir, algo="nll", handle_signals=False)
    assert result.algo == "nll" and result.original_algo == "dpo" and not result.identical
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    # NLL can use the tie (its target stands): 10 distinct items in the same sequence, 5 full steps.
    assert manifest["learner"]["counters"]["pairs_trained"] == 10 and result.steps == 5
    looked_at = [tuple(r) for e in read_log(result.run_dir / "consumption.jsonl") for r in e["records"]]
    original_order = [tuple(r) for e in read_log(run_dir / "consumption.jsonl") for r in e["records"]]
    assert looked_at == original_order


def test_export_import_into_a_fresh_broker_then_replay_is_identical(original, tmp_path) -> None:
    from sipstream.bus.broker import EmbeddedBroker
    from sipstream.config import merged
    from sipstream.replay.export import export_topic, import_export

    cfg, run_dir = original
    archive = (tmp_path / "archive").as_uri()
    exported = export_topic(T.PAIRS, run_dir, archive, fmt="parquet")
    assert exported["records"] == 12
    export_topic(T.WEIGHTS, run_dir, archive, fmt="jsonl")
    lines = (tmp_path / "archive" / T.WEIGHTS / "partition-0.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(json.loads(lines[0])["value"])["run_name"] == "orig"

    with EmbeddedBroker() as fresh:
        target = merged(cfg, run_dir=str(tmp_path / "runs"),
                        bus={"bootstrap_servers": fresh.bootstrap_servers, "topic_prefix": "restored."})
        # Something already on the target topic: the imported records land at other offsets.
        T.create_topics(target.bus, fresh.bootstrap_servers, T.load_specs())
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": fresh.bootstrap_servers})
        for p in range(4):
            producer.produce(target.bus.topic(T.PAIRS), value=b"{}", partition=p)
        assert producer.flush(10) == 0

        imported = import_export(archive, target, fresh.bootstrap_servers)
        manifest = json.loads((imported / "manifest.json").read_text())
        assert manifest["topics"][T.PAIRS]["live_name"] == "restored.sip.pairs"
        assert all(s >= 1 for s, _ in manifest["topics"][T.PAIRS]["partitions"].values())
        assert manifest["imported"]["offset_map"][T.PAIRS]

        result = replay_learner(imported, handle_signals=False)
        assert result.identical and result.steps == 5


def test_the_cli_replays_and_exports(original, tmp_path, request) -> None:
    from typer.testing import CliRunner

    from sipstream.cli import app
    from sipstream.config import LoggingConfig
    from sipstream.errors import UserError
    from sipstream.telemetry.logs import configure_logging

    _, run_dir = original
    runner = CliRunner()
    request.addfinalizer(lambda: configure_logging(LoggingConfig()))  # the commands log to CliRunner's stderr

    done = runner.invoke(app, ["replay", "learner", "--run", str(run_dir)])
    assert done.exit_code == 0, done.output
    assert "identical to the original run" in done.output

    done = runner.invoke(app, ["export", "sip.pairs", "--run", str(run_dir), "--to", str(tmp_path / "x")])
    assert done.exit_code == 0 and "exported 12 records" in done.output, done.output

    failed = runner.invoke(app, ["replay", "learner", "--run", str(tmp_path / "nowhere")])
    assert isinstance(failed.exception, UserError) and "no manifest.json" in str(failed.exception)


def test_a_pipeline_run_exports_with_its_learner_and_replays_after_import(original, broker, tmp_path) -> None:
    import shutil

    from sipstream.config import merged
    from sipstream.ops.manifest import pipeline_manifest
    from sipstream.replay.export import export_topic, import_export

    cfg, run_dir = original
    pipeline_dir = tmp_path / "pipeline"
    shutil.copytree(run_dir, pipeline_dir / cfg.run_name)  # as `sipstream run` lays it out
    manifest = pipeline_manifest(pipeline_dir, cfg, broker.bootstrap_servers, topics=[T.PAIRS, T.WEIGHTS])
    assert manifest["learner_run"] == cfg.run_name and manifest["topics"][T.PAIRS]["records"] == 12

    export_topic(T.PAIRS, pipeline_dir, str(tmp_path / "archive"))
    target = merged(cfg, run_dir=str(tmp_path / "runs"), bus={"topic_prefix": f"again.{cfg.bus.topic_prefix}"})
    imported = import_export(str(tmp_path / "archive"), target, broker.bootstrap_servers)
    assert (imported / cfg.run_name / "consumption.jsonl").is_file()
    result = replay_learner(imported, handle_signals=False)  # follows the pipeline manifest to its learner
    assert result.identical


def _spec(partitions: dict) -> str:
    return ",".join(f"{p}:{first}-{end}" for p, (first, end) in sorted(partitions.items()))


def test_from_offsets_replays_a_range_the_same_way_with_or_without_the_run_dir(original) -> None:
    import pytest

    from sipstream.errors import UserError
    from sipstream.replay.run import offsets_sequence, parse_offsets

    cfg, run_dir = original
    partitions = json.loads((run_dir / "manifest.json").read_text())["topics"][T.PAIRS]["partitions"]
    spec = _spec(partitions)
    with_run = replay_learner(run_dir, from_offsets=spec, handle_signals=False)
    without_run = replay_learner(None, from_offsets=spec, config=cfg, handle_signals=False)
    # Same ranges, same config and initial weights → the same sequence and the same model, run dir or not.
    assert with_run.records == without_run.records == 12
    assert with_run.final_sha256 == without_run.final_sha256 is not None
    looked_at = [tuple(r) for e in read_log(without_run.run_dir / "consumption.jsonl") for r in e["records"]]
    assert looked_at == offsets_sequence(parse_offsets(spec))
    manifest = json.loads((without_run.run_dir / "manifest.json").read_text())
    assert manifest["replay_of"]["from_offsets"] == {"topic": cfg.bus.topic(T.PAIRS), "ranges": spec}

    # A range past the end of the topic is refused before training, naming the partition.
    last = max(int(p) for p in partitions)
    end = partitions[str(last)][1]
    with pytest.raises(UserError, match=f"partition {last}"):
        replay_learner(None, from_offsets=f"{last}:{end + 5}-{end + 9}", config=cfg, handle_signals=False)


def test_replay_with_pretrain_trains_the_next_token_baseline_on_the_same_records(original) -> None:
    _, run_dir = original
    result = replay_learner(run_dir, algo="pretrain", handle_signals=False)
    assert result.algo == "pretrain" and result.original_algo == "dpo" and not result.identical
    assert result.final_sha256 is not None and result.records == 12
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["learner"]["algo"] == "pretrain" and manifest["replay_of"]["algo"] == "dpo"
    # Every distinct item's original suffix, the tie's too (pretrain has no preference to tie on).
    assert manifest["learner"]["counters"]["pairs_trained"] == 10
    looked_at = [tuple(r) for e in read_log(result.run_dir / "consumption.jsonl") for r in e["records"]]
    assert looked_at == [tuple(r) for e in read_log(run_dir / "consumption.jsonl") for r in e["records"]]


def test_a_pipeline_run_whose_broker_is_gone_replays_its_learner_from_the_archive(original, broker, tmp_path) -> None:
    """What a default `sipstream run` leaves: an in-memory broker that ended with the run, every topic in
    RUN_DIR/export/. The replay puts sip.pairs back on a broker of its own and follows the same log."""
    import shutil

    from sipstream.ops.manifest import pipeline_manifest
    from sipstream.replay.export import export_topic

    cfg, run_dir = original
    pipeline_dir = tmp_path / "pipeline"
    shutil.copytree(run_dir, pipeline_dir / cfg.run_name)
    pipeline_manifest(pipeline_dir, cfg, broker.bootstrap_servers, topics=[T.PAIRS], ephemeral=True, archive="export")
    export_topic(T.PAIRS, pipeline_dir, str(pipeline_dir / "export"), bootstrap=broker.bootstrap_servers)
    for path in (pipeline_dir / "manifest.json", pipeline_dir / cfg.run_name / "manifest.json"):
        manifest = json.loads(path.read_text())
        manifest["bus"]["bootstrap_servers"] = "127.0.0.1:1"  # nothing answers there any more
        path.write_text(json.dumps(manifest))

    result = replay_learner(pipeline_dir, handle_signals=False)
    assert result.identical and result.steps == 5
    replayed = json.loads((result.run_dir / "manifest.json").read_text())
    assert replayed["replay_of"]["from_archive"] == str((pipeline_dir / "export").resolve())
    # The learner's own directory inside the pipeline's finds the same archive.
    assert replay_learner(pipeline_dir / cfg.run_name, handle_signals=False).identical


def test_a_topic_missing_from_a_live_broker_is_said_at_once(original, tmp_path) -> None:
    import shutil
    import time

    import pytest

    from sipstream.config import merged
    from sipstream.errors import UserError
    from sipstream.replay.export import export_topic

    cfg, run_dir = original
    started = time.monotonic()
    elsewhere = merged(cfg, bus={"topic_prefix": "never-created."})
    with pytest.raises(UserError, match=f"topic never-created.{T.PAIRS} does not exist"):
        replay_learner(None, from_offsets="0:0-3", config=elsewhere, handle_signals=False)

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["topics"][T.PAIRS]["live_name"] = "never-created." + T.PAIRS
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"topic never-created.{T.PAIRS} does not exist"):
        replay_learner(moved, handle_signals=False)
    with pytest.raises(UserError, match=f"topic never-created.{T.PAIRS} does not exist"):
        export_topic(T.PAIRS, moved, str(tmp_path / "archive"))
    assert not (tmp_path / "archive").exists()  # nothing written for a failed export
    assert time.monotonic() - started < 30  # three checks, none waiting on the fetcher's 30 s
