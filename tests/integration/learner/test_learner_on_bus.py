"""The learner against the real embedded broker: it consumes pairs, skips what it must, publishes
weights a running rollout worker hot-loads, writes to s3:// through a local moto server, and resumes
exactly after kill -9."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from sipstream.bus import topics as T
from sipstream.config.learner import LearnerConfig
from sipstream.learner.loop import run_learner


def learner_cfg(tmp_path: Path, **overrides) -> LearnerConfig:
    base = {"algo": "dpo", "device": "cpu", "lr": 1e-3, "batch_pairs": 2, "max_policy_lag": 100, "sync_every": 1,
            "weight_store": (tmp_path / "store").as_uri(), "checkpoint_dir": tmp_path / "ckpt", "poll_timeout_s": 0.2}
    return LearnerConfig(**{**base, **overrides})


def test_learner_trains_publishes_and_a_rollout_worker_hot_loads(bus, tiny_cfg, tmp_path, make_pair) -> None:
    from sipstream.bus.runner import StageRunner
    from sipstream.models.hf import HFModel
    from sipstream.stages.rollout import RolloutStage

    pairs = [make_pair(0), make_pair(1),
             make_pair(1),  # an upstream duplicate (at-least-once): trained once
             make_pair(90, tie=True),  # an exact tie: no DPO pair, skipped and counted
             b"{not json",  # dead-lettered, the stream goes on
             *(make_pair(i) for i in range(2, 6))]
    bus.produce(T.PAIRS, pairs, key="k")  # one partition: a fixed order
    state = run_learner(tiny_cfg, bus.bootstrap, learner=learner_cfg(tmp_path, max_steps=3), handle_signals=False)

    assert (state.step, state.version) == (3, 3)
    c = state.counters
    assert c["pairs_trained"] == 6 and c["skipped_duplicate"] == 1 and c["skipped_no_rejected"] == 1
    assert c["deadlettered"] == 1 and c["consumed"] == 9
    announcements = [a for a in bus.values(T.WEIGHTS, expect=3) if a["run_name"] == tiny_cfg.run_name]
    assert [a["version"] for a in announcements] == [1, 2, 3] and [a["step"] for a in announcements] == [1, 2, 3]
    assert all(not T.load_specs()[T.WEIGHTS].errors(a) for a in announcements)
    sidecar = json.loads(Path(announcements[-1]["uri"].removeprefix("file://")).with_suffix(".json").read_text())
    assert sidecar["sha256"] == announcements[-1]["sha256"] and sidecar["algo"] == "dpo"
    metrics = [m for m in bus.values(T.METRICS, expect=1) if m["source"] == "learner"]
    assert metrics and metrics[-1]["gauges"]["policy_version"] == 3 and metrics[-1]["counters"]["steps"] == 3
    assert metrics[-1]["gauges"]["reward_margin"] is not None
    assert [d["error"] for d in bus.values(T.DEADLETTER, expect=1)] == ["bad_json"]

    # A rollout worker started on the initial policy picks up the newest version between batches.
    policy = HFModel(tiny_cfg.models.policy)
    stage = RolloutStage(policy, tiny_cfg.rollout, tiny_cfg.run_name)
    bus.produce(T.REWRITTEN, [{"item_id": f"r{i}:1", "doc_id": f"r{i}", "chunk_index": 1, "prefix": "Once upon",
                               "suffix": " a time", "seed": i, "rewrite": None, "why": ["kept"]} for i in range(2)])
    StageRunner(stage, tiny_cfg, bus.bootstrap).run(until=lambda s: s.counters["consumed"] >= 2)
    assert stage.policy_version == 3 and stage.counters["weights_loaded"] == 1
    assert {r["policy_version"] for r in bus.values(T.ROLLOUTS, expect=2)} == {3}
    from safetensors.torch import load_file

    published = load_file(announcements[-1]["uri"].removeprefix("file://"))
    assert torch.equal(policy.model.transformer.h[0].attn.c_attn.weight, published["transformer.h.0.attn.c_attn.weight"])

    # A second learner in the same run resumes from the checkpoint: nothing left to train.
    again = run_learner(tiny_cfg, bus.bootstrap, learner=learner_cfg(tmp_path, max_steps=4, idle_timeout_s=1.0),
                        handle_signals=False)
    assert again.step == 3 and again.counters["pairs_trained"] == 6


def test_stale_pairs_are_dropped_and_counted(bus, tiny_cfg, tmp_path, make_pair) -> None:
    # max_policy_lag 0, sync every step: after step 1 (version 1) pairs of version 0 are stale.
    bus.produce(T.PAIRS, [make_pair(i, policy_version=0) for i in range(4)] + [make_pair(9, policy_version=1)],
                key="same")  # one partition: a fixed order
    state = run_learner(tiny_cfg, bus.bootstrap, handle_signals=False,
                        learner=learner_cfg(tmp_path, max_policy_lag=0, idle_timeout_s=1.5))
    assert state.counters["pairs_trained"] == 3  # 2 before the first publication, then only version 1
    assert state.counters["dropped_stale"] == 2 and state.step == 2


# --------------------------------------------------------------------------- s3 through moto


@pytest.fixture
def moto_s3(monkeypatch, moto_endpoint):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(endpoint_url=moto_endpoint).mkdir("weights")
    return moto_endpoint


def test_weights_to_s3_and_a_worker_loads_them(bus, tiny_cfg, tmp_path, make_pair, moto_s3) -> None:
    import s3fs

    from sipstream.models.hf import HFModel

    bus.produce(T.PAIRS, [make_pair(i) for i in range(2)])
    cfg = learner_cfg(tmp_path, max_steps=1, weight_store="s3://weights/exp", weight_store_options={"endpoint_url": moto_s3})
    run_learner(tiny_cfg, bus.bootstrap, learner=cfg, handle_signals=False)
    (announcement,) = [a for a in bus.values(T.WEIGHTS, expect=1) if a["run_name"] == tiny_cfg.run_name]
    assert announcement["uri"] == f"s3://weights/exp/{tiny_cfg.run_name}/v00000001.safetensors"
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3)
    assert fs.exists(f"weights/exp/{tiny_cfg.run_name}/v00000001.json")
    worker = HFModel(tiny_cfg.models.policy)
    worker.load_weights(announcement["uri"], announcement["sha256"], version="1")  # fsspec reads AWS_ENDPOINT_URL
    assert worker.weights_version == "1"


# --------------------------------------------------------------------------- kill -9 and exact resume


def final_checkpoint(tmp_path: Path, run_name: str) -> dict:
    latest = max((tmp_path / "runs" / run_name / "learner").glob("step-*"))
    return json.loads((latest / "state.json").read_text())


@pytest.mark.slow
def test_kill_9_then_restart_trains_every_pair_once_and_ends_with_the_same_weights(bus, tiny_cfg, tmp_path, make_pair,
                                                                                   figures, start_learner) -> None:
    bus.produce(T.PAIRS, [make_pair(i) for i in range(24)], key="one-partition")  # fixed order
    log = tmp_path / "learner.log"

    reference = start_learner(tiny_cfg, "ref", "uninterrupted", tmp_path, log)
    assert reference.wait(180) == 0, log.read_text()[-3000:]

    victim = start_learner(tiny_cfg, "killed", "killed", tmp_path, log)
    checkpoints = tmp_path / "runs" / "killed" / "learner"
    deadline = time.monotonic() + 120
    while not (checkpoints / "step-00000004").exists():
        assert victim.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    checkpoint_at_kill = final_checkpoint(tmp_path, "killed")["step"]
    assert checkpoint_at_kill < 12  # killed mid-run
    restart_started = time.monotonic()
    restarted = start_learner(tiny_cfg, "killed", "killed", tmp_path, log)
    assert restarted.wait(180) == 0, log.read_text()[-3000:]
    restart_s = time.monotonic() - restart_started

    weights = [a for a in bus.values(T.WEIGHTS, expect=8) if a["run_name"] in ("uninterrupted", "killed")]
    last = {run: max((a for a in weights if a["run_name"] == run), key=lambda a: a["version"]) for run in ("uninterrupted", "killed")}
    assert last["killed"]["step"] == last["uninterrupted"]["step"] == 12
    assert last["killed"]["sha256"] == last["uninterrupted"]["sha256"]
    state = final_checkpoint(tmp_path, "killed")
    assert state["counters"]["pairs_trained"] == 24 and state["counters"].get("skipped_duplicate", 0) == 0
    assert sorted(state["seen_ids"]) == sorted(f"p{i}:1" for i in range(24))  # each pair once, none skipped
    assert state == {**final_checkpoint(tmp_path, "uninterrupted"), "seen_ids": state["seen_ids"],
                     "counters": state["counters"], "config_hash": state["config_hash"]}
    figures("learner_kill_9_resume", pairs_in=24, steps=12, checkpoint_step_at_kill=checkpoint_at_kill,
            pairs_trained=state["counters"]["pairs_trained"],
            skipped_duplicate=state["counters"].get("skipped_duplicate", 0),
            same_weights_as_uninterrupted=last["killed"]["sha256"] == last["uninterrupted"]["sha256"],
            restarted_run_s=round(restart_s, 1))
