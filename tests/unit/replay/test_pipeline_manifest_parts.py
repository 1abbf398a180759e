"""The parts of a pipeline manifest that need no broker: who produced and consumed each topic, and the
sha256 of model files (cached by path, mtime and size)."""

from __future__ import annotations

import json
import os

import pytest

from sipstream.bus import topics as T
from sipstream.errors import UserError
from sipstream.models.sources import model_source
from sipstream.ops.manifest import pipeline_roles
from sipstream.runs.manifest import files_sha256
from sipstream.stages import stage_class

PIPELINE = ("split", "rewrite", "rollout", "judge", "assemble")


def test_roles_name_every_stage_that_produced_or_consumed_each_topic() -> None:
    roles = pipeline_roles(PIPELINE)
    assert roles[T.DOCUMENTS] == {"produced_by": ["ingest"], "consumed_by": ["split"]}
    assert roles[T.ROLLOUTS] == {"produced_by": ["rollout"], "consumed_by": ["judge"]}
    assert roles[T.PAIRS] == {"produced_by": ["assemble"], "consumed_by": ["learner"]}
    assert roles[T.WEIGHTS] == {"produced_by": ["learner"], "consumed_by": ["rollout"]}
    assert roles[T.METRICS]["produced_by"] == [*PIPELINE, "learner"] and roles[T.METRICS]["consumed_by"] == []
    assert set(roles) == set(T.CORE_TOPICS)


def test_a_stage_class_is_found_without_building_it() -> None:
    assert stage_class("judge").input_topic == T.ROLLOUTS
    with pytest.raises(UserError, match="unknown stage 'nope'"):
        stage_class("nope")


def test_model_files_are_hashed_once_and_again_only_when_they_change(tmp_path) -> None:
    import hashlib

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    (model / ".scratch").write_text("ignored")  # hidden files (caches, half-written builds) are not the model
    cache = tmp_path / "cache.json"

    first = files_sha256(model, cache)
    expected = hashlib.sha256(
        f"config.json\0{hashlib.sha256(b'{}').hexdigest()}\n"
        f"sub/weights.bin\0{hashlib.sha256(bytes(1000)).hexdigest()}\n".encode()).hexdigest()
    assert first == expected and len(json.loads(cache.read_text())) == 2

    # A cached entry is trusted while path, mtime and size match: plant a wrong hash to see it used.
    entries = json.loads(cache.read_text())
    weights = str((model / "sub" / "weights.bin").resolve())
    entries[weights][2] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert files_sha256(model, cache) != first
    # Touched (new mtime): hashed again, and the cache corrected.
    os.utime(model / "sub" / "weights.bin", ns=(1, 1))
    assert files_sha256(model, cache) == first and json.loads(cache.read_text())[weights][2] != "0" * 64
    assert files_sha256(model / "config.json") == hashlib.sha256(b"{}").hexdigest()


def test_model_source_records_files_where_there_are_some(tmp_path) -> None:
    from sipstream.config.models import ModelSpec

    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    local = model_source(ModelSpec(source=str(folder), cache_dir=tmp_path / "cache"))
    assert local["path"] == str(folder.resolve()) and local["sha256"] == files_sha256(folder)
    assert (tmp_path / "cache" / ".sha256-cache.json").is_file()

    unbuilt = model_source(ModelSpec(source="tiny-gpt2", cache_dir=tmp_path / "empty"))
    assert unbuilt["sha256"] is None and "does not exist" in unbuilt["why"]
    served = model_source(ModelSpec(backend="openai", openai_model="big-judge"))
    assert served["sha256"] is None and served["openai_model"] == "big-judge"


def test_a_run_on_an_in_memory_broker_is_read_from_its_archive_older_manifests_too(tmp_path) -> None:
    from sipstream.replay.source import archived

    embedded = {"bootstrap_servers": None, "embedded": {"storage": "memory://tansu/"}}
    marked = {"kind": "pipeline", "bus": {"ephemeral": True}, "archive": "export", "config": {"bus": embedded}}
    assert archived(tmp_path, marked) == tmp_path / "export"
    assert archived(tmp_path, marked | {"bus": {"ephemeral": False}}) is None
    # Before `bus.ephemeral` was recorded: the recorded config says whether the run started its own memory broker.
    assert archived(tmp_path, {"kind": "pipeline", "bus": {}, "config": {"bus": embedded}}) == tmp_path / "export"
    cluster = {"bootstrap_servers": "kafka:9092", "embedded": {"storage": "memory://tansu/"}}
    assert archived(tmp_path, {"kind": "pipeline", "bus": {}, "config": {"bus": cluster}}) is None
    # The learner inside a `sipstream run` directory shares the pipeline's broker.
    (tmp_path / "manifest.json").write_text(json.dumps(marked | {"learner_run": "tiny"}))
    assert archived(tmp_path / "tiny", {"kind": "learner", "bus": {}}) == tmp_path / "export"
    assert archived(tmp_path / "other", {"kind": "learner", "bus": {}}) is None
