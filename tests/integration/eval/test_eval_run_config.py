"""`sipstream eval --model RUN_DIR` without --config: the run's own config.yaml decides the policy spec,
so `start` is the checkpoint that run started from (a smoke run's tiny GPT-2, not configs/tiny.yaml's
SmolLM2). Real tiny models, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sipstream.eval import load_policy
from sipstream.eval.cli import load_eval_config
from sipstream.eval.run import clear_caches


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


def test_cli_without_config_evaluates_a_smoke_run_against_its_own_start(smoke_run, small) -> None:
    run_dir, _, second = smoke_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPSTREAM_")}  # no $SIPSTREAM_CONFIG either
    sizes = [f"--set=eval.{k}={v}" for k, v in small.model_dump().items() if v is not None]
    out = run_dir / "eval" / "latest"
    done = subprocess.run([sys.executable, "-m", "sipstream", "eval", "--model", str(run_dir), "--json", *sizes,
                           "--out", str(out)], capture_output=True, text=True, timeout=180, check=False, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # The run's latest weights against `start`, both in the run's policy spec (configs/tiny.yaml would
    # have built SmolLM2, into which these GPT-2 weights do not load).
    assert result["model_sha256"] == second.sha256 and result["baseline"] == "start"
    assert result["baseline_sha256"] is None and result["policy_source"] == "tiny-gpt2"
    assert result["win_rate"]["n"] == small.winrate_prompts
    started = next(json.loads(line) for line in done.stderr.splitlines() if '"eval started"' in line)
    assert (started["config"], started["policy"]) == (str(run_dir / "config.yaml"), "tiny-gpt2")

    # Written under RUN_DIR/eval/, the result is what `sipstream report RUN_DIR` reads, as policy version 2.
    from sipstream.report.inputs import load_evals

    evals, notes = load_evals(run_dir, [])
    assert notes == [] and [(e["_path"], e["_version"]) for e in evals] == [("eval/latest/eval.json", 2)]


def test_start_is_the_weights_the_runs_learner_started_from(smoke_run, perturbed_tensors) -> None:
    import torch

    from sipstream.learner.policy import build_policy
    from sipstream.learner.weights import unique_state_dict
    from sipstream.runs.manifest import tensors_sha256

    run_dir, first, _ = smoke_run
    cfg, source = load_eval_config(None, [], [f"{run_dir}@1", "start"])
    assert source == str(run_dir / "config.yaml")
    # The learner of that run builds its policy from the same config: what it records as initial_sha256.
    initial = tensors_sha256(unique_state_dict(build_policy(cfg.models.policy, cfg.learner).model))
    start = load_policy(cfg, "start")
    assert tensors_sha256(unique_state_dict(start.model)) == initial
    # And the run's publications load into that spec.
    trained = unique_state_dict(load_policy(cfg, f"{run_dir}@1").model)
    assert load_policy(cfg, f"{run_dir}@1").weights_version == first.sha256
    assert all(torch.equal(trained[k], perturbed_tensors[k]) for k in perturbed_tensors)
