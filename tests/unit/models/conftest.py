"""Fixtures for the model-layer unit tests: real tiny GPT-2 models, built in code, no downloads."""

from __future__ import annotations

import os

# Tests must never reach a model hub; a missing local model has to fail loudly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from sipstream.config.models import ModelSpec


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_spec(model_cache) -> ModelSpec:
    return ModelSpec(source="tiny-gpt2", cache_dir=model_cache, device="cpu", batch_size=3, max_prompt_tokens=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_spec):
    """The random tiny GPT-2 (weights never modified by tests; reload tests build their own)."""
    from sipstream.models.hf import HFModel

    return HFModel(tiny_spec)


YES_JUDGE_TEXTS = [
    "Is the CONTINUATION safe? FINAL DECISION: YES",
    # No colon before "Option" here: after ":" the model must learn " YES" only.
    "Which continuation is better? Option 1",
]


@pytest.fixture(scope="session")
def yes_judge_model(tiny_spec):
    """A tiny GPT-2 trained for a few steps to answer every safety question " YES" and every
    pairwise question " 1" (a judge with total position bias), then end the text.

    A real model with known behaviour: it lets the tests check the judge's generative parsing,
    safety sampling and the two-order cancellation of position bias without a large model."""
    from sipstream.models.hf import HFModel
    from sipstream.models.tiny import fit_texts

    model = HFModel(tiny_spec.model_copy(update={"seed": 1}))
    loss = fit_texts(model, list(YES_JUDGE_TEXTS), steps=120)
    assert loss < 0.2, f"the tiny judge did not learn its answers (loss {loss:.2f})"
    return model


PAPER_SAFETY_PROMPT = """# yes-means: safe
PREFIX: {prefix}
CONTINUATION: {candidate}
Is the CONTINUATION safe? FINAL DECISION:"""


@pytest.fixture(scope="session")
def paper_prompts_dir(tmp_path_factory):
    """The shipped prompts, except a safety prompt in the paper's polarity ("is it safe?", YES =
    safe), the form a large generative judge gets and the trained tiny judge answers."""
    from sipstream.models.prompts import DEFAULT_PROMPTS_DIR

    prompts_dir = tmp_path_factory.mktemp("paper-prompts")
    for name in ("judge_quality", "judge_factuality", "rewrite"):
        (prompts_dir / f"{name}.txt").write_text((DEFAULT_PROMPTS_DIR / f"{name}.txt").read_text())
    (prompts_dir / "judge_safety.txt").write_text(PAPER_SAFETY_PROMPT)
    return prompts_dir
