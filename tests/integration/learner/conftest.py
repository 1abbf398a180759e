"""Learner integration fixtures: the tiny GPT-2 as policy, pairs on the real embedded broker."""

from __future__ import annotations

import os

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
    candidate = lambda text, total: {"kind": "rollout", "index": 0, "text": text, "total": total}
    return {"item_id": f"{tag}{i}:1", "doc_id": f"{tag}{i}", "prefix": f"Chapter {i}. In the morning",
            "suffix": good, "seed": i, "policy_version": policy_version,
            "chosen": None if tie else candidate(good, 2.0), "rejected": None if tie else candidate(bad, 0.5),
            "target": candidate(good, 2.0)}


@pytest.fixture
def make_pair():
    """Builds a valid sip.pairs record: make_pair(i, tag=, policy_version=, tie=)."""
    return _make_pair
