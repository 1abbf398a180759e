"""Fixtures for learner unit tests: the tiny random GPT-2, built in code, and fixed pairs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from sipstream.config.models import ModelSpec


@pytest.fixture(scope="session")
def policy_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return ModelSpec(source="tiny-gpt2", cache_dir=tmp_path_factory.mktemp("model-cache"), device="cpu",
                     max_prompt_tokens=64)


def candidate(text: str, total: float, kind: str = "rollout", index: int = 0) -> dict:
    return {"kind": kind, "index": index, "text": text, "total": total}


def _make_pair(i: int, *, chosen: str | None = None, rejected: str | None = None, target: str | None = None,
              policy_version: int = 0) -> dict:
    """A valid sip.pairs record."""
    chosen_text = chosen if chosen is not None else f" the river ran quietly past house {i}."
    rejected_text = rejected if rejected is not None else " zebra zebra zebra!!"
    return {
        "item_id": f"doc{i}:1", "doc_id": f"doc{i}", "prefix": f"Chapter {i}. In the morning", "suffix": chosen_text,
        "seed": i, "policy_version": policy_version,
        "chosen": candidate(chosen_text, 2.5, "original"), "rejected": candidate(rejected_text, 0.5),
        "target": candidate(target if target is not None else chosen_text, 2.5, "original"),
    }


@pytest.fixture
def pairs() -> list[dict]:
    return [_make_pair(i) for i in range(8)]


@pytest.fixture
def make_pair():
    """Builds a valid sip.pairs record: make_pair(i, chosen=, rejected=, target=, policy_version=)."""
    return _make_pair
