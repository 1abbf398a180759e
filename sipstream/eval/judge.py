"""How far the judge can be trusted, on labelled text from sources it never met (`sipstream judge-eval`).

Two kinds of labelled set, each a JSON Lines file a user can bring (`--safety-file`, `--factuality-file`):

    safety       {"text": ..., "label": "safe" | "unsafe", "kind"?: ..., "prefix"?: ...}
    factuality   {"reference": ..., "true": ..., "false": ..., "topic"?: ...}

Safety is read as a ranking (ROC AUC of the judge's P(safe), safe = positive, with a bootstrap 95%
interval) and as a decision (accuracy at the judge's operating threshold `judge.safety_threshold`), and
broken down by `kind` (e.g. explicit and implicit harm, hard negatives, ordinary prose). Factuality is
read as pairs: given the reference passage, does the true statement score higher than its minimally
edited false twin (ties count half)? The shipped held-out sets (`sipstream/data/heldout/judge_*.jsonl`)
were written for this and share no source with the judge's prompts or any training data.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sipstream.errors import UserError
from sipstream.eval.stats import rate_with_ci
from sipstream.models.judge import Judge

HELDOUT = resources.files("sipstream.data") / "heldout"
HELDOUT_SAFETY = "judge_safety.jsonl"
HELDOUT_FACTUALITY = "judge_factuality.jsonl"
BOOTSTRAP_ROUNDS = 1000


@dataclass(frozen=True)
class SafetyItem:
    text: str
    safe: bool
    kind: str = "unspecified"
    prefix: str = ""
    """Text the item continues, if any (shown to the judge before `text`)."""


@dataclass(frozen=True)
class FactualityPair:
    reference: str
    true: str
    false: str
    topic: str = "unspecified"


# --------------------------------------------------------------------------- reading labelled files


def _records(path: Path | str, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-empty line; one clear line for a file that is not JSON Lines."""
    try:
        text = (path if hasattr(path, "read_text") else Path(path)).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg}); a {what} file has one JSON object per line") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        out.append((number, value))
    if not out:
        raise UserError(f"{what} file {path} holds no records")
    return out


def _text_field(value: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    field = value.get(key)
    if field is None and not required:
        return ""
    if not isinstance(field, str) or (required and not field.strip()):
        raise UserError(f"{where}: field {key!r} must be a non-empty string")
    return field


def read_safety_file(path: Path | str) -> list[SafetyItem]:
    """Items of a safety file; both labels must occur (an AUC needs them)."""
    items = []
    for number, value in _records(path, "safety"):
        where = f"{path}:{number}"
        label = value.get("label")
        if label not in ("safe", "unsafe"):
            raise UserError(f"{where}: label must be \"safe\" or \"unsafe\", got {label!r}")
        kind = value.get("kind") or "unspecified"
        items.append(SafetyItem(_text_field(value, "text", where), label == "safe", str(kind),
                                _text_field(value, "prefix", where, required=False)))
    if len({item.safe for item in items}) < 2:
        raise UserError(f"safety file {path} needs both safe and unsafe items to measure the judge")
    return items


def read_factuality_file(path: Path | str) -> list[FactualityPair]:
    pairs = []
    for number, value in _records(path, "factuality"):
        where = f"{path}:{number}"
        pairs.append(FactualityPair(_text_field(value, "reference", where), _text_field(value, "true", where),
                                    _text_field(value, "false", where), str(value.get("topic") or "unspecified")))
    return pairs


def heldout_safety() -> list[SafetyItem]:
    return read_safety_file(HELDOUT / HELDOUT_SAFETY)


def heldout_factuality() -> list[FactualityPair]:
    return read_factuality_file(HELDOUT / HELDOUT_FACTUALITY)


# --------------------------------------------------------------------------- statistics


def roc_auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: pair[0])
    positives = sum(1 for _, label in ranked if label)
    negatives = len(ranked) - positives
    if not positives or not negatives:
        raise ValueError("AUC needs at least one positive and one negative item")
    # Mann-Whitney U from mid-ranks: O(n log n), ties get their average rank.
    rank_sum, index = 0.0, 0
    while index < len(ranked):
        end = index
        while end + 1 < len(ranked) and ranked[end + 1][0] == ranked[index][0]:
            end += 1
        mid_rank = (index + end) / 2 + 1
        rank_sum += mid_rank * sum(1 for _, label in ranked[index:end + 1] if label)
        index = end + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def bootstrap_auc_interval(scores: Sequence[float], labels: Sequence[int | bool], rounds: int = BOOTSTRAP_ROUNDS,
                           seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC, resampling positives and negatives separately (stratified,
    so every resample has both classes)."""
    rng = random.Random(seed)
    positives = [s for s, label in zip(scores, labels, strict=True) if label]
    negatives = [s for s, label in zip(scores, labels, strict=True) if not label]
    values = sorted(
        roc_auc([*(rng.choice(positives) for _ in positives), *(rng.choice(negatives) for _ in negatives)],
                [1] * len(positives) + [0] * len(negatives))
        for _ in range(rounds)
    )
    return values[int(0.025 * (rounds - 1))], values[int(0.975 * (rounds - 1))]


def _rounded(value: float) -> float:
    return round(value, 4)


def safety_figures(items: Sequence[SafetyItem], scores: Sequence[float], threshold: float, seed: int = 0
                   ) -> dict[str, Any]:
    """AUC (+ bootstrap interval), accuracy at `threshold` (+ Wilson interval) and the same per kind.

    Per kind: accuracy and mean P(safe); for a kind of one label, its AUC against every item of the
    other label (e.g. hard negatives vs all unsafe items: can the judge tell them apart?)."""
    labels = [item.safe for item in items]
    correct = [(score >= threshold) == item.safe for item, score in zip(items, scores, strict=True)]
    accuracy, accuracy_ci = rate_with_ci(sum(correct), len(items))
    auc = roc_auc(scores, labels)
    by_kind: dict[str, Any] = {}
    for kind in sorted({item.kind for item in items}):
        members = [i for i, item in enumerate(items) if item.kind == kind]
        kind_labels = {items[i].safe for i in members}
        entry: dict[str, Any] = {
            "n": len(members),
            "label": "mixed" if len(kind_labels) > 1 else ("safe" if kind_labels.pop() else "unsafe"),
            "accuracy": _rounded(sum(correct[i] for i in members) / len(members)),
            "mean_p_safe": _rounded(sum(scores[i] for i in members) / len(members)),
        }
        if entry["label"] != "mixed":
            others = [i for i, item in enumerate(items) if item.safe != items[members[0]].safe]
            chosen = members + others
            entry["auc_vs_other_label"] = _rounded(roc_auc([scores[i] for i in chosen], [labels[i] for i in chosen]))
        by_kind[kind] = entry
    return {
        "n": len(items), "n_safe": sum(labels), "n_unsafe": len(items) - sum(labels),
        "auc": _rounded(auc), "auc_ci": [_rounded(v) for v in bootstrap_auc_interval(scores, labels, seed=seed)],
        "threshold": threshold, "accuracy": _rounded(accuracy), "accuracy_ci": [_rounded(v) for v in accuracy_ci],
        "by_kind": by_kind,
    }


def factuality_figures(pairs: Sequence[FactualityPair], true_scores: Sequence[float], false_scores: Sequence[float]
                       ) -> dict[str, Any]:
    """Share of pairs whose true statement outscores its false twin (ties half), overall and per topic."""
    wins = [1.0 if t > f else 0.5 if t == f else 0.0 for t, f in zip(true_scores, false_scores, strict=True)]
    accuracy, ci = rate_with_ci(sum(wins), len(pairs))
    by_topic = {}
    for topic in sorted({pair.topic for pair in pairs}):
        members = [w for w, pair in zip(wins, pairs, strict=True) if pair.topic == topic]
        by_topic[topic] = {"n": len(members), "pair_accuracy": _rounded(sum(members) / len(members))}
    return {"n_pairs": len(pairs), "pair_accuracy": _rounded(accuracy), "pair_accuracy_ci": [_rounded(v) for v in ci],
            "ties": sum(1 for w in wins if w == 0.5), "by_topic": by_topic}


# --------------------------------------------------------------------------- running the judge


def judge_safety(judge: Judge, items: Sequence[SafetyItem], seed: int = 0) -> list[float]:
    """P(safe) per item, as the pipeline asks it (the item's prefix, if any, then its text)."""
    return judge.safety_scores([item.prefix for item in items], [item.text for item in items],
                               [seed + index for index in range(len(items))])


def judge_factuality(judge: Judge, pairs: Sequence[FactualityPair], seed: int = 0) -> tuple[list[float], list[float]]:
    """Factuality of each pair's true and false statement against its reference (no prefix)."""
    count = len(pairs)
    scores = judge.factuality_scores([""] * (2 * count), [pair.reference for pair in pairs] * 2,
                                     [pair.true for pair in pairs] + [pair.false for pair in pairs],
                                     [seed + index for index in range(2 * count)])
    return scores[:count], scores[count:]


def evaluate_judge(judge: Judge, *, safety: Sequence[SafetyItem] | None = None,
                   factuality: Sequence[FactualityPair] | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The figures of `safety_figures` / `factuality_figures` for the sets given, each with what it cost
    (seconds per item on this machine, and the judge prompts it took)."""
    say = progress or (lambda message: None)
    out: dict[str, Any] = {}
    if safety:
        say(f"safety: {len(safety)} items")
        started = time.perf_counter()
        scores = judge_safety(judge, safety, seed)
        seconds = time.perf_counter() - started
        out["safety"] = safety_figures(safety, scores, judge.spec.safety_threshold, seed) | {
            "seconds": round(seconds, 2), "seconds_per_item": round(seconds / len(safety), 4)}
    if factuality:
        say(f"factuality: {len(factuality)} pairs (true and false statement each)")
        started = time.perf_counter()
        true_scores, false_scores = judge_factuality(judge, factuality, seed)
        seconds = time.perf_counter() - started
        out["factuality"] = factuality_figures(factuality, true_scores, false_scores) | {
            "seconds": round(seconds, 2), "seconds_per_pair": round(seconds / len(factuality), 4)}
    return out


def format_figures(figures: dict[str, Any]) -> list[str]:
    """The human-readable lines `sipstream judge-eval` prints for `evaluate_judge`'s figures."""
    lines = []
    if "safety" in figures:
        s = figures["safety"]
        lines.append(f"safety      AUC {s['auc']:.3f} [{s['auc_ci'][0]:.3f}, {s['auc_ci'][1]:.3f}]  accuracy "
                     f"{s['accuracy']:.3f} at P(safe) >= {s['threshold']:g}  ({s['n_safe']} safe, {s['n_unsafe']} unsafe;"
                     f" {s['seconds_per_item']:.3f} s/item)")
        for kind, k in s["by_kind"].items():
            vs = f"  AUC vs {'unsafe' if k['label'] == 'safe' else 'safe'} {k['auc_vs_other_label']:.3f}" \
                if "auc_vs_other_label" in k else ""
            lines.append(f"  {kind:18s} n={k['n']:<4d} {k['label']:6s} accuracy {k['accuracy']:.3f}  "
                         f"mean P(safe) {k['mean_p_safe']:.3f}{vs}")
    if "factuality" in figures:
        f = figures["factuality"]
        lines.append(f"factuality  pair accuracy {f['pair_accuracy']:.3f} [{f['pair_accuracy_ci'][0]:.3f}, "
                     f"{f['pair_accuracy_ci'][1]:.3f}]  ({f['n_pairs']} pairs, {f['ties']} ties; "
                     f"{f['seconds_per_pair']:.3f} s/pair)")
        for topic, t in f["by_topic"].items():
            lines.append(f"  {topic:18s} n={t['n']:<4d} pair accuracy {t['pair_accuracy']:.3f}")
    return lines
