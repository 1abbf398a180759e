"""Learner integration fixtures: the tiny GPT-2 as policy, pairs on the real embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from sipstream.config import merged


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def tiny_cfg(bus, model_cache, tmp_path):
    return merged(bus.cfg, run_dir=str(tmp_path / "runs"),
                  models={"policy": {"source": "tiny-gpt2", "cache_dir": str(model_cache), "device": "cpu",
                                     "max_prompt_tokens": 64}},
                  rollout={"rollouts": 1})


def _make_pair(i: int, *, tag: str = "p", policy_version: int = 0, tie: bool = False) -> dict:
    good, bad = f" the river ran quietly past house {i}.", " zebra zebra zebra!!"
    def candidate(text, total):
        return {"kind": "rollout", "index": 0, "text": text, "total": total}
    return {"item_id": f"{tag}{i}:1", "doc_id": f"{tag}{i}", "prefix": f"Chapter {i}. In the morning",
            "suffix": good, "seed": i, "policy_version": policy_version,
            "chosen": None if tie else candidate(good, 2.0), "rejected": None if tie else candidate(bad, 0.5),
            "target": candidate(good, 2.0)}


@pytest.fixture
def make_pair():
    """Builds a valid sip.pairs record: make_pair(i, tag=, policy_version=, tie=)."""
    return _make_pair


ROOT = Path(__file__).resolve().parents[3]


def _start_learner(tiny_cfg, group: str, run_name: str, tmp_path: Path, log: Path, **learner: Any) -> subprocess.Popen:
    """`python -m sipstream.learner` on the tiny policy (the kill -9 tests' settings; `learner` overrides
    `learner.*` settings, e.g. `checkpoint_every=1000`)."""
    settings = {
        "bus.topic_prefix": tiny_cfg.bus.topic_prefix, "bus.group_prefix": group, "run_name": run_name,
        "run_dir": str(tmp_path / "runs"), "models.policy.source": "tiny-gpt2",
        "models.policy.cache_dir": str(tiny_cfg.models.policy.cache_dir), "models.policy.device": "cpu",
        "models.policy.max_prompt_tokens": 64, "runner.metrics_interval_s": 1,
        "learner.algo": "dpo", "learner.device": "cpu", "learner.lr": 0.001, "learner.batch_pairs": 2,
        "learner.max_steps": 12, "learner.sync_every": 3, "learner.checkpoint_every": 2,
        "learner.max_policy_lag": 100, "learner.poll_timeout_s": 0.2,
        **{f"learner.{k}": v for k, v in learner.items()},
    }
    args = [f"--set={k}={v}" for k, v in settings.items()]
    return subprocess.Popen([sys.executable, "-m", "sipstream.learner", "--bootstrap", tiny_cfg.bus.bootstrap_servers, *args],
                            cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def start_learner():
    """start_learner(tiny_cfg, group, run_name, tmp_path, log, **learner) -> Popen of `python -m sipstream.learner`."""
    return _start_learner
