"""Model stages on the real broker with the tiny GPT-2: rollout hot reload from sip.weights."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from sipstream.bus import topics as T
from sipstream.bus.runner import StageRunner
from sipstream.config import merged


def rewritten_items(n: int, tag: str) -> list[dict]:
    return [{"item_id": f"{tag}{i}:1", "doc_id": f"{tag}{i}", "chunk_index": 1, "prefix": f"Chapter {i}. It was a",
             "suffix": " dark and stormy night", "seed": i, "rewrite": None, "why": ["kept"]} for i in range(n)]


def announcement(run_name: str, version: int, path, sha: str | None = None) -> dict:
    digest = sha or hashlib.sha256(path.read_bytes()).hexdigest()
    return {"run_name": run_name, "version": version, "uri": f"file://{path}", "sha256": digest, "step": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat()}


@pytest.fixture
def tiny_cfg(bus):
    return merged(bus.cfg, models={"policy": {"source": "tiny-gpt2"}}, rollout={"rollouts": 2})


def test_rollout_stage_tags_versions_and_hot_reloads_weights(bus, tiny_cfg, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from sipstream.stages.rollout import build

    stage = build(tiny_cfg)
    # Version 1: the same architecture with different (scaled) weights, as a learner would publish.
    state = {k: v.detach().clone() * 1.5 for k, v in stage.policy.model.state_dict().items() if k != "lm_head.weight"}
    good = tmp_path / "v1.safetensors"
    save_file(state, str(good))
    corrupt = tmp_path / "v2.safetensors"
    corrupt.write_bytes(good.read_bytes()[:1000])  # truncated upload

    bus.produce(T.REWRITTEN, rewritten_items(4, "a"))
    runner = StageRunner(stage, tiny_cfg, bus.bootstrap)
    runner.run(until=lambda s: s.counters["consumed"] >= 4)
    first = bus.values(T.ROLLOUTS, expect=4)
    assert {r["policy_version"] for r in first} == {0}
    assert all(len(r["rollouts"]) == 2 for r in first)

    before = stage.policy.model.transformer.wte.weight.detach().clone()
    bus.produce(T.WEIGHTS, [announcement(tiny_cfg.run_name, 1, good)], key=tiny_cfg.run_name)
    bus.produce(T.WEIGHTS, [announcement("another-run", 9, good)], key="another-run")  # not ours: ignored
    bus.produce(T.REWRITTEN, rewritten_items(4, "b"))
    runner = StageRunner(stage, tiny_cfg, bus.bootstrap)
    runner.run(until=lambda s: s.counters["consumed"] >= 4)
    assert stage.policy_version == 1
    assert torch.allclose(stage.policy.model.transformer.wte.weight, before * 1.5)
    second = [r for r in bus.values(T.ROLLOUTS, expect=8) if r["doc_id"].startswith("b")]
    assert len(second) == 4 and {r["policy_version"] for r in second} == {1}
    # Same prefixes and seeds, new weights: the samples change with the policy version.
    assert sorted(r["rollouts"] for r in second) != sorted(r["rollouts"] for r in first)

    # A corrupt file (sha256 of the good one announced) is refused; version 1 keeps serving.
    bus.produce(T.WEIGHTS, [announcement(tiny_cfg.run_name, 2, corrupt, sha=hashlib.sha256(good.read_bytes()).hexdigest())],
                key=tiny_cfg.run_name)
    bus.produce(T.REWRITTEN, rewritten_items(2, "c"))
    runner = StageRunner(stage, tiny_cfg, bus.bootstrap)
    runner.run(until=lambda s: s.counters["consumed"] >= 2)
    assert stage.policy_version == 1 and stage.counters["weights_refused"] == 1
    third = [r for r in bus.values(T.ROLLOUTS, expect=10) if r["doc_id"].startswith("c")]
    assert len(third) == 2 and {r["policy_version"] for r in third} == {1}
