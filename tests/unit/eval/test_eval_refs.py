"""Resolving model references to weights files (no model is loaded here; see the integration tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sipstream.errors import UserError
from sipstream.eval.policy import resolve_weights


def _publish(folder: Path, version: int, payload: bytes, stale_uri: bool = False) -> str:
    """A weights file and its sidecar as the learner's WeightStore writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"v{version:08d}.safetensors"
    path.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    uri = f"file:///gone/elsewhere/v{version:08d}.safetensors" if stale_uri else path.as_uri()
    (folder / f"v{version:08d}.json").write_text(json.dumps(
        {"version": version, "step": version, "uri": uri, "sha256": sha, "run_name": "r"}))
    return sha


def test_latest_and_numbered_versions_from_sidecars_even_after_the_run_moved(tmp_path: Path) -> None:
    store = tmp_path / "run" / "r" / "weights" / "r"
    shas = {v: _publish(store, v, f"weights {v}".encode(), stale_uri=True) for v in (1, 2, 10)}
    latest = resolve_weights(str(tmp_path / "run"))
    assert (latest.version, latest.sha256) == (10, shas[10])
    assert latest.path_or_uri == str(store / "v00000010.safetensors")  # the file beside the sidecar
    assert resolve_weights(f"{tmp_path / 'run'}@2").sha256 == shas[2]
    assert resolve_weights(str(store)).version == 10  # the weight store's own folder works too


def test_versions_from_an_exported_weights_topic_and_the_learner_manifest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "export" / "sip.weights").mkdir(parents=True)
    announcement = {"run_name": "r", "version": 3, "uri": "s3://bucket/r/v00000003.safetensors", "sha256": "c" * 64}
    (run / "export" / "sip.weights" / "partition-0.jsonl").write_text(
        json.dumps({"partition": 0, "offset": 0, "value": json.dumps(announcement)}) + "\n")
    (run / "manifest.json").write_text(json.dumps({"format": 1, "kind": "learner", "learner": {"final_weights": {
        "version": 4, "step": 4, "sha256": "d" * 64, "uri": "s3://bucket/r/v00000004.safetensors"}}}))
    assert resolve_weights(f"{run}@3").path_or_uri == announcement["uri"]
    latest = resolve_weights(str(run))
    assert (latest.version, latest.sha256, latest.path_or_uri) == (4, "d" * 64, "s3://bucket/r/v00000004.safetensors")


def test_a_file_reference_is_hashed_and_unknown_forms_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"tensors")
    assert resolve_weights(str(path)).sha256 == hashlib.sha256(b"tensors").hexdigest()
    assert resolve_weights("start").sha256 is None
    with pytest.raises(UserError, match=r"pass 'start', a \.safetensors file"):
        resolve_weights(str(tmp_path / "w.bin"))


def test_a_folder_with_two_learners_is_ambiguous(tmp_path: Path) -> None:
    _publish(tmp_path / "a", 1, b"a")
    sidecar = tmp_path / "b" / "v00000002.json"
    _publish(tmp_path / "b", 2, b"b")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "run_name": "other"}))
    with pytest.raises(UserError, match="several learner runs"):
        resolve_weights(str(tmp_path))
