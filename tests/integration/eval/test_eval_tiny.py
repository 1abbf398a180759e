"""`sipstream eval` end to end on the real tiny GPT-2 (policy and judge), with known answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from sipstream.errors import UserError
from sipstream.eval import evaluate, load_policy
from sipstream.eval.run import clear_caches


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


def test_model_against_itself_with_the_same_seeds_is_all_ties(eval_cfg, small, tmp_path) -> None:
    SMALL = small
    result = evaluate(eval_cfg, "start", "start", SMALL, out_dir=tmp_path)
    wins = result["win_rate"]
    # Same weights, same per-prompt seeds: identical continuations, every prompt a tie.
    assert (wins["wins"], wins["ties"], wins["losses"], wins["n"]) == (0, SMALL.winrate_prompts, 0, SMALL.winrate_prompts)
    assert wins["rate"] == 0.5 and wins["ci95"][0] < 0.5 < wins["ci95"][1] and wins["interval"] == "wilson"
    for axis in ("safety", "factuality", "quality"):
        assert result[axis]["model"] == result[axis]["baseline"]
    assert result["safety"]["model"]["n"] == SMALL.safety_prompts
    assert result["factuality"]["model"]["n"] == SMALL.factuality_pairs
    assert result["quality"]["model"]["tokens"] == SMALL.perplexity_docs * SMALL.perplexity_max_tokens
    # A random GPT-2 is about as perplexed as its vocabulary is large (50,257 tokens).
    assert 5_000 < result["quality"]["model"]["perplexity"] < 500_000
    # Files: the JSON equals the result, the table and the per-prompt rows are there.
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert "| win rate vs baseline" in (tmp_path / "eval.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert sum(r["metric"] == "win_rate" for r in rows) == SMALL.winrate_prompts
    assert all(r["model"] == r["baseline"] for r in rows if r["metric"] == "win_rate")

    # Evaluating again in this process is served from the caches: nothing sampled, nothing judged.
    again = evaluate(eval_cfg, "start", "start", SMALL)
    assert result["cost"]["judge_calls"] > 0 and result["cost"]["generation_s"] > 0
    assert again["cost"]["judge_calls"] == 0 and again["cost"]["generation_s"] == 0
    assert {k: v for k, v in again.items() if k not in ("cost", "created_at")} == \
        {k: v for k, v in result.items() if k not in ("cost", "created_at")}


def test_model_against_itself_with_other_seeds_straddles_half(eval_cfg, small) -> None:
    ecfg = small.model_copy(update={"winrate_prompts": 8, "baseline_seed": 1})
    wins = evaluate(eval_cfg, "start", "start", ecfg)["win_rate"]
    assert wins["n"] == 8 and wins["ties"] < 8  # different samples, so the judge was asked
    assert wins["ci95"][0] <= 0.5 <= wins["ci95"][1]


def _state(model):
    from sipstream.learner.weights import unique_state_dict

    return unique_state_dict(model.model)


def test_load_policy_accepts_every_reference_form(eval_cfg, published_run, perturbed_tensors, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from sipstream.models.base import sha256_file

    run_dir, first, second = published_run
    start = _state(load_policy(eval_cfg, "start"))
    assert not torch.equal(start["transformer.wte.weight"], perturbed_tensors["transformer.wte.weight"])

    path = tmp_path / "perturbed.safetensors"
    save_file(perturbed_tensors, str(path))
    from_file = load_policy(eval_cfg, str(path))
    assert all(torch.equal(_state(from_file)[k], perturbed_tensors[k]) for k in perturbed_tensors)
    assert from_file.weights_version == sha256_file(path)
    assert load_policy(eval_cfg, path.as_uri()).weights_version == sha256_file(path)

    latest = load_policy(eval_cfg, str(run_dir))  # the run's latest publication: version 2
    assert latest.weights_version == second.sha256
    assert load_policy(eval_cfg, f"{run_dir}@1").weights_version == first.sha256
    # The configured policy as built is untouched by the loads above (each is its own instance).
    assert torch.equal(_state(load_policy(eval_cfg, "start"))["transformer.wte.weight"], start["transformer.wte.weight"])

    with pytest.raises(UserError, match="has no weights version 9; it has 1, 2"):
        load_policy(eval_cfg, f"{run_dir}@9")
    with pytest.raises(UserError, match=r"'start', a \.safetensors file"):
        load_policy(eval_cfg, "best-checkpoint")
    with pytest.raises(UserError, match="no published weights"):
        load_policy(eval_cfg, str(tmp_path))
    with pytest.raises(UserError, match="weights file not found"):
        load_policy(eval_cfg, str(tmp_path / "missing.safetensors"))


def test_factuality_prefers_what_the_model_was_taught(eval_cfg) -> None:
    """Hand-checkable: a tiny GPT-2 trained on three statements prefers them to their twins (accuracy
    1), and the same pairs with the roles swapped score 0."""

    from sipstream.eval.metrics import factuality
    from sipstream.eval.sets import FactPair
    from sipstream.models.hf import HFModel
    from sipstream.models.tiny import fit_texts

    pairs = [FactPair("p1", "x", "Paris is the capital of France.", "Paris is the capital of Peru."),
             FactPair("p2", "x", "Water boils at one hundred degrees.", "Water boils at nine hundred degrees."),
             FactPair("p3", "x", "The sun rises in the east.", "The sun rises in the west.")]
    model = HFModel(eval_cfg.models.policy)  # its own instance: training it touches no other test
    fit_texts(model, [model.tokenizer.eos_token + p.true for p in pairs], steps=25)
    summary, margins = factuality(model, pairs)
    assert summary["accuracy"] == 1.0 and all(m > 0 for m in margins)
    swapped, _ = factuality(model, [FactPair(p.probe_id, p.category, p.false, p.true) for p in pairs])
    assert swapped["accuracy"] == 0.0 and swapped["mean_margin"] == pytest.approx(-summary["mean_margin"])


def test_perplexity_equals_exp_mean_nll_computed_naively(eval_cfg) -> None:
    import torch

    from sipstream.eval.metrics import held_out_perplexity
    from sipstream.models.hf import HFModel

    model = HFModel(eval_cfg.models.policy)
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune.",
             "Call me Ishmael. Some years ago, never mind how long precisely."]
    ppl, tokens = held_out_perplexity(model, texts, max_tokens=64)
    # Naive: each text after GPT-2's start token (<|endoftext|>), every token's NLL summed by hand.
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[model.tokenizer.eos_token_id] + model.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logits = model.model(ids).logits[0, :-1].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        nll -= sum(log_probs[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1))
        count += ids.shape[1] - 1
    assert tokens == count
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_cli_prints_json_and_reports_user_errors_in_one_line(eval_cfg_file, published_run, small, tmp_path) -> None:
    run_dir, _, second = published_run
    base = [sys.executable, "-m", "sipstream", "eval", "--config", str(eval_cfg_file)]
    sizes = [f"--set=eval.{k}={v}" for k, v in small.model_dump().items() if v is not None]
    done = subprocess.run([*base, "--model", str(run_dir), "--baseline", "none", "--json", *sizes, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is the JSON alone: logs go to stderr
    # The run's latest publication was evaluated, alone.
    assert result["model"] == str(run_dir) and result["model_sha256"] == second.sha256
    assert result["baseline"] is None and result["win_rate"] is None
    assert result["safety"]["baseline"] is None and result["safety"]["model"]["n"] == small.safety_prompts
    assert result["eval_config"] == small.model_dump(mode="json")
    assert json.loads((tmp_path / "eval.json").read_text())["created_at"] == result["created_at"]

    bad = subprocess.run([*base, "--model", "no-such-run"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        ("sipstream: error: cannot evaluate model 'no-such-run': pass 'start', a .safetensors file (path or URI), "
        "a run directory, or RUN_DIR@VERSION")]
