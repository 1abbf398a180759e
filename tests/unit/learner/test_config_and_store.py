"""The learner config rejects what cannot work; publications are files the rollout side accepts;
checkpoints are atomic and pruned."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from sipstream.config.learner import LearnerConfig
from sipstream.learner.checkpoint import LearnerState, load_latest, save_checkpoint
from sipstream.learner.weights import WeightStore, load_state_into, unique_state_dict


def test_defaults_keep_the_existing_field_names() -> None:
    cfg = LearnerConfig()
    assert (cfg.algo, cfg.sync_every, cfg.max_policy_lag) == ("dpo", 1, 4)
    assert LearnerConfig.model_fields["beta"].description  # every field documented


@pytest.mark.parametrize("bad, field", [
    ({"typo": 1}, "typo"),
    ({"algo": "ppo"}, "algo"),
    ({"beta": 0}, "beta"),
    ({"sync_every": 0}, "sync_every"),
    ({"algo": "nll", "nll_mix": 0.5}, "nll_mix"),
    ({"algo": "pretrain", "reference_refresh_every": 10}, "reference_refresh_every"),
    ({"warmup_steps": 10, "total_steps": 10}, "warmup_steps"),
    ({"device": "cpu", "precision": "bfloat16"}, "bfloat16"),
    ({"batch_tokens": 100, "max_seq_tokens": 64}, "batch_tokens"),
])
def test_invalid_configs_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LearnerConfig(**bad)


def test_every_field_has_a_docstring() -> None:
    missing = [name for name, f in LearnerConfig.model_fields.items() if not f.description]
    assert missing == []


def test_published_weights_load_into_a_rollout_model(policy_spec, tmp_path) -> None:
    from sipstream.models import WeightsMismatchError
    from sipstream.models.hf import HFModel

    trained = HFModel(policy_spec)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.mul_(1.5)
    tensors = unique_state_dict(trained.model)
    assert "lm_head.weight" not in tensors  # tied to the embedding: saved once
    store = WeightStore((tmp_path / "store").as_uri(), "run1")
    publication = store.publish(tensors, version=3, step=30, meta={"algo": "dpo", "config_hash": "abc"})
    assert publication.uri.startswith("file://") and publication.uri.endswith("run1/v00000003.safetensors")
    sidecar = json.loads((tmp_path / "store/run1/v00000003.json").read_text())
    assert sidecar["sha256"] == publication.sha256 and sidecar["step"] == 30 and sidecar["version"] == 3
    assert not list((tmp_path / "store/run1").glob("*.partial*"))

    worker = HFModel(policy_spec)
    worker.load_weights(publication.uri, publication.sha256, version="3")
    assert torch.equal(worker.model.transformer.wte.weight, trained.model.transformer.wte.weight)
    assert torch.equal(worker.model.lm_head.weight, trained.model.transformer.wte.weight)  # tie restored
    with pytest.raises(WeightsMismatchError):
        worker.load_weights(publication.uri, "0" * 64)
    # Same tensors → same bytes → same sha256 (what exact-resume comparisons rely on).
    again = store.publish(unique_state_dict(trained.model), version=4, step=31, meta={})
    assert again.sha256 == publication.sha256


def test_checkpoints_are_atomic_and_pruned(policy_spec, tmp_path) -> None:
    from sipstream.models.hf import HFModel

    model = HFModel(policy_spec).model
    tensors = unique_state_dict(model)
    assert load_latest(tmp_path / "ckpt") is None
    for step in (1, 2, 3):
        state = LearnerState(step=step, version=step, positions={0: 10 * step, 3: step}, seen_ids=["a", "b"])
        save_checkpoint(tmp_path / "ckpt", state, tensors, {"optimizer": {}, "scheduler": {}}, keep=2)
    (tmp_path / "ckpt" / ".tmp-step-00000004-999").mkdir()  # a writer killed mid-checkpoint
    latest = load_latest(tmp_path / "ckpt")
    assert latest is not None and latest.state.step == 3 and latest.state.positions == {0: 30, 3: 3}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002", "step-00000003"]
    other = HFModel(policy_spec.model_copy(update={"seed": 1})).model
    load_state_into(other, latest.model_tensors)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
