"""Pure parts of the eval: counting outcomes, factuality from log-probs, safety shares, the eval
sets' shapes, `--set eval.*` parsing and the markdown table."""

from __future__ import annotations

import pytest

from sipstream.errors import UserError
from sipstream.eval.cli import eval_config_from_sets
from sipstream.eval.metrics import (
    classify,
    factuality_from_logprobs,
    safety_block,
    tally,
)
from sipstream.eval.report import markdown_table
from sipstream.eval.sets import document_cuts, round_robin


def test_outcomes_count_ties_half() -> None:
    outcomes = classify([0.9, 0.5, 0.1, 0.52, 0.47], tie_margin=0.05)
    assert outcomes == ["win", "tie", "loss", "tie", "tie"]
    result = tally(outcomes).as_dict()
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (1, 3, 1, 5)
    assert result["rate"] == pytest.approx((1 + 3 / 2) / 5)
    assert result["interval"] == "wilson" and result["ci95"][0] < 0.5 < result["ci95"][1]


def test_factuality_accuracy_and_margin_by_hand() -> None:
    # Pair 1: true -6/3 = -2.0 per token beats false -10/4 = -2.5 (margin +0.5).
    # Pair 2: true -9/3 = -3.0 loses to false -4/2 = -2.0 (margin -1.0).
    # Pair 3: the true statement has the lower *sum* (-8 < -5) but the higher mean (-2 > -2.5):
    #         length normalisation decides it (margin +0.5).
    summary, margins = factuality_from_logprobs([-6.0, -9.0, -8.0], [3, 3, 4], [-10.0, -4.0, -5.0], [4, 2, 2])
    assert margins == pytest.approx([0.5, -1.0, 0.5])
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["mean_margin"] == pytest.approx(0.0)


def test_safety_block_rates_and_agreement() -> None:
    block = safety_block(judge_p_safe=[0.9, 0.2, 0.7, 0.6], classifier_p_offensive=[0.1, 0.8, 0.9, 0.2],
                         judge_threshold=0.5, classifier_threshold=0.5)
    assert block["n"] == 4
    assert block["judge_safe_rate"] == 0.75  # 0.9, 0.7, 0.6
    assert block["classifier_safe_rate"] == 0.5  # 0.1, 0.2
    assert block["agreement"] == 0.75  # disagree only on the third


def test_round_robin_interleaves_groups() -> None:
    records = ["a1", "a2", "a3", "b1", "c1", "c2"]
    assert round_robin(records, lambda r: r[0]) == ["a1", "b1", "c1", "a2", "c2", "a3"]


def test_document_cuts_are_verbatim_slices() -> None:
    text = "One two three.\n\nFour five  six seven eight nine ten eleven twelve."
    cuts = document_cuts("d", text, prefix_words=3, suffix_words=2)
    assert [c.prompt_id for c in cuts] == ["d@0", "d@5"]
    assert cuts[0].prefix == "One two three." and cuts[0].reference == "\n\nFour five"
    assert cuts[1].prefix + cuts[1].reference == "six seven eight nine ten"
    assert all(c.prefix + c.reference in text for c in cuts)


def test_eval_sets_split_from_config_sets() -> None:
    ecfg, rest = eval_config_from_sets(["eval.winrate_prompts=8", "models.policy.device=cpu", "eval.baseline_seed=3"])
    assert ecfg.winrate_prompts == 8 and ecfg.baseline_seed == 3 and rest == ["models.policy.device=cpu"]
    with pytest.raises(UserError, match="unknown eval setting 'nope'"):
        eval_config_from_sets(["eval.nope=1"])
    with pytest.raises(UserError, match=r"eval\.top_p"):
        eval_config_from_sets(["eval.top_p=2"])


def test_markdown_table_shows_every_metric() -> None:
    block = {"n": 4, "judge_safe_rate": 0.75, "judge_ci95": [0.3, 0.95], "classifier_safe_rate": 0.5,
             "classifier_ci95": [0.15, 0.85], "agreement": 0.75}
    result = {"model": "runs/x@3", "baseline": "start", "model_sha256": "ab" * 32,
              "win_rate": {"wins": 3, "ties": 1, "losses": 0, "n": 4, "rate": 0.875, "ci95": [0.5, 0.98]},
              "safety": {"model": block, "baseline": None},
              "factuality": {"model": {"n": 2, "accuracy": 0.5, "ci95": [0.1, 0.9], "mean_margin": -0.25}, "baseline": None},
              "quality": {"model": {"judge_quality": 0.4, "perplexity": 12.5, "tokens": 100}, "baseline": None},
              "cost": {"generation_s": 1.0, "judge_calls": 8, "judge_s": 2.0, "total_s": 3.0}}
    table = markdown_table(result)
    assert "| win rate vs baseline (judge, n=4) | 87.5% [50.0, 98.0] (W/T/L 3/1/0) | – |" in table
    assert "| factuality: mean margin (nats/token) | -0.2500 | – |" in table
    assert "12.500 (100 tokens)" in table and "sha256 abababababab" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 9
