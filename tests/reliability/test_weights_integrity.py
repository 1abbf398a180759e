"""Weights integrity: only safetensors are ever loaded. A weights announcement whose file fails its sha256,
is truncated, or is a pickle (raw, or torch.save's zip of pickles) is refused by a running rollout worker,
which keeps serving its current version (seen in `policy_version` on the records it produces) and never
unpickles anything."""

from __future__ import annotations

import datetime as dt
import hashlib
import pickle
import re
import threading
import time
from pathlib import Path

import pytest

from sipstream.bus import topics as T
from sipstream.config import project_root

# Ways code could deserialize pickles. torch.load is allowed only with weights_only=True.
_UNPICKLING = re.compile(r"\b(pickle|cPickle|dill|joblib|cloudpickle)\.(load|loads|Unpickler)\b|\bimport (dill|cloudpickle)\b")
_TORCH_LOAD = re.compile(r"\btorch\.load\(([^)]*)\)")


def test_no_code_path_unpickles_weights() -> None:
    offenders = []
    for path in sorted((project_root() / "sipstream").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.name}: {m.group(0)}" for m in _UNPICKLING.finditer(text)]
        offenders += [f"{path.name}: {m.group(0)}" for m in _TORCH_LOAD.finditer(text) if "weights_only=True" not in m.group(1)]
    assert offenders == []


class _Boobytrap:
    """Unpickling this creates a file: proof that a loader ran code from a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _announce(bus, run_name: str, version: int, path: Path, sha256: str | None = None) -> None:
    digest = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
    bus.produce(T.WEIGHTS, [{"run_name": run_name, "version": version, "uri": path.as_uri(), "sha256": digest,
                             "step": version, "created_at": dt.datetime.now(dt.UTC).isoformat()}], key=run_name)


def _item(i: int) -> dict:
    return {"item_id": f"w{i}:1", "doc_id": f"w{i}", "chunk_index": 1, "prefix": f"Chapter {i}. The morning",
            "suffix": " was cold and the river ran on.", "seed": i, "rewrite": None, "why": []}


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_bad_weights_are_refused_and_the_rollout_worker_keeps_its_version(bus, tmp_path, tmp_path_factory, figures) -> None:
    import torch
    from safetensors.torch import save_file

    from sipstream.bus.runner import StageRunner
    from sipstream.config import RolloutConfig
    from sipstream.config.models import ModelSpec
    from sipstream.models.hf import HFModel
    from sipstream.stages.rollout import RolloutStage

    policy = HFModel(ModelSpec(source="tiny-gpt2", cache_dir=tmp_path_factory.mktemp("cache"), device="cpu",
                               max_prompt_tokens=64))
    # Version 1: real, valid weights (the current ones nudged), tied tensors saved once as the learner does.
    tensors, seen = {}, set()
    for name, tensor in policy.model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = (tensor + 0.01).contiguous()
    good = tmp_path / "v1.safetensors"
    save_file(tensors, str(good))
    marker = tmp_path / "pickle-code-ran"
    bad = {
        "sha256 mismatch": (good, "0" * 64),
        "truncated": (tmp_path / "v3.safetensors", None),
        "pickle": (tmp_path / "v4.pkl", None),
        "torch.save": (tmp_path / "v5.pt", None),
    }
    bad["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # its own sha256 is right
    bad["pickle"][0].write_bytes(pickle.dumps({"transformer.wte.weight": _Boobytrap(marker)}))
    torch.save({"transformer.wte.weight": _Boobytrap(marker)}, bad["torch.save"][0])

    stage = RolloutStage(policy, RolloutConfig(rollouts=1), bus.cfg.run_name)
    runner = StageRunner(stage, bus.cfg, bus.bootstrap)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    versions: dict[str, int] = {}
    try:
        _announce(bus, bus.cfg.run_name, 1, good)
        bus.produce(T.REWRITTEN, [_item(0)])
        _wait(lambda: stage.counters["weights_loaded"] == 1)
        loaded = policy.model.transformer.wte.weight.detach().clone()
        for version, (_label, (path, sha256)) in enumerate(bad.items(), start=2):
            _announce(bus, bus.cfg.run_name, version, path, sha256)
            _wait(lambda v=version: stage.counters["weights_refused"] == v - 1)
            bus.produce(T.REWRITTEN, [_item(version)])
        outputs = {r["item_id"]: r["policy_version"] for r in bus.values(T.ROLLOUTS, expect=1 + len(bad))}
        versions = {label: outputs[f"w{v}:1"] for v, label in enumerate(bad, start=2)}
    finally:
        runner.stop()
        thread.join(30)

    assert outputs["w0:1"] == 1
    assert versions == dict.fromkeys(bad, 1)  # every record after a refusal still says version 1
    assert torch.equal(policy.model.transformer.wte.weight, loaded) and policy.weights_version == "1"
    assert stage.counters["weights_refused"] == len(bad) and stage.counters["weights_loaded"] == 1
    assert not marker.exists(), "a pickle announced as weights was unpickled"
    figures("weights_integrity", announcements=1 + len(bad), loaded=stage.counters["weights_loaded"],
            refused=stage.counters["weights_refused"], policy_version_after_each_refusal=versions,
            pickle_code_ran=marker.exists())


@pytest.mark.parametrize("problem", ["sha256", "truncated", "pickle"])
def test_refusal_reasons_name_the_problem(problem: str, tmp_path: Path) -> None:
    """The reason a refusal logs, per kind of bad file (read_verified_weights is what every backend calls)."""
    import torch
    from safetensors.torch import save_file

    from sipstream.models.base import WeightsMismatchError, read_verified_weights

    good = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64)}, str(good))
    data = {"sha256": good.read_bytes(), "truncated": good.read_bytes()[:-10], "pickle": pickle.dumps({"w": [1.0] * 64})}[problem]
    path = tmp_path / "announced"
    path.write_bytes(data)
    sha256 = "f" * 64 if problem == "sha256" else hashlib.sha256(data).hexdigest()
    expected = {"sha256": "sha256 is", "truncated": "truncated", "pickle": "not safetensors"}[problem]
    with pytest.raises(WeightsMismatchError, match=expected):
        read_verified_weights(str(path), sha256)
