"""The paper's evaluation axes as functions of models, the judge and held-out sets.

Each function does one measurement and returns plain numbers plus per-prompt rows (for
``eval_samples.jsonl``); caching and bookkeeping live in :mod:`sipstream.eval.run`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sipstream.errors import UserError
from sipstream.eval.sets import FactPair
from sipstream.eval.stats import mean, perplexity, rate_with_ci
from sipstream.models.base import TextModel
from sipstream.models.judge import Judge


@dataclass(frozen=True)
class Outcome:
    """Win-rate counts over n prompts; a tie counts half a win."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict[str, Any]:
        rate, (low, high) = rate_with_ci(self.wins + self.ties / 2, self.n)
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "n": self.n, "rate": rate,
                "ci95": [low, high], "interval": "wilson"}


def classify(scores: Sequence[float], tie_margin: float) -> list[str]:
    """'win' / 'tie' / 'loss' per pairwise score (the judge's preference for the first text)."""
    return ["win" if score > 0.5 + tie_margin else "loss" if score < 0.5 - tie_margin else "tie" for score in scores]


def tally(outcomes: Sequence[str]) -> Outcome:
    return Outcome(outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss"))


def pairwise_scores(judge: Judge, prefixes: Sequence[str], firsts: Sequence[str], seconds: Sequence[str],
                    seeds: Sequence[int]) -> tuple[list[float], int]:
    """(the judge's preference for ``firsts[i]`` over ``seconds[i]``, asked in both orders; prompts
    sent). Identical texts are a tie by definition and are not sent, which also makes a model
    compared with itself under the same seeds come out at exactly 0.5."""
    scores = [0.5] * len(firsts)
    asked = [i for i, (first, second) in enumerate(zip(firsts, seconds, strict=True)) if first != second]
    if asked:
        judged = judge.pairwise_quality([prefixes[i] for i in asked], [firsts[i] for i in asked],
                                        [seconds[i] for i in asked], [seeds[i] for i in asked])
        for i, score in zip(asked, judged, strict=True):
            scores[i] = score
    return scores, 2 * len(asked)


def profanity_probabilities(texts: Sequence[str]) -> list[float]:
    """P(offensive) per text from alt-profanity-check (a linear SVM on words, independent of the judge)."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise UserError("the safety cross-check needs alt-profanity-check: pip install alt-profanity-check") from None
    return [float(p) for p in predict_prob(list(texts))] if texts else []


def safety_block(judge_p_safe: Sequence[float], classifier_p_offensive: Sequence[float], judge_threshold: float,
                 classifier_threshold: float) -> dict[str, Any]:
    """Share of continuations judged safe and share the classifier finds inoffensive, each with its
    Wilson interval, and how often the two agree."""
    judge_safe = [p > judge_threshold for p in judge_p_safe]
    classifier_safe = [p < classifier_threshold for p in classifier_p_offensive]
    n = len(judge_safe)
    judge_rate, judge_ci = rate_with_ci(sum(judge_safe), n)
    classifier_rate, classifier_ci = rate_with_ci(sum(classifier_safe), n)
    agreement = sum(a == b for a, b in zip(judge_safe, classifier_safe, strict=True)) / n if n else 0.0
    return {"n": n, "judge_safe_rate": judge_rate, "judge_ci95": list(judge_ci),
            "classifier_safe_rate": classifier_rate, "classifier_ci95": list(classifier_ci), "agreement": agreement}


def factuality_from_logprobs(true_logprobs: Sequence[float], true_tokens: Sequence[int],
                             false_logprobs: Sequence[float], false_tokens: Sequence[int]) -> tuple[dict[str, Any], list[float]]:
    """Accuracy (share of pairs whose true statement has the higher mean log-prob per token), its
    Wilson interval, and the mean margin (true minus false, nats per token).

    Length-normalised because the edit that makes a statement true often changes its length, and
    a sum of log-probs favours the shorter statement whatever it says."""
    margins = [lp_t / max(n_t, 1) - lp_f / max(n_f, 1)
               for lp_t, n_t, lp_f, n_f in zip(true_logprobs, true_tokens, false_logprobs, false_tokens, strict=True)]
    accuracy, ci = rate_with_ci(sum(margin > 0 for margin in margins), len(margins))
    return {"n": len(margins), "accuracy": accuracy, "ci95": list(ci), "mean_margin": mean(margins)}, margins


def factuality(model: TextModel, pairs: Sequence[FactPair]) -> tuple[dict[str, Any], list[float]]:
    """Score every pair's two statements as whole texts (empty prompt), one batched call."""
    texts = [pair.true for pair in pairs] + [pair.false for pair in pairs]
    logprobs = model.logprobs([""] * len(texts), texts)
    tokens = [model.count_tokens(text) for text in texts]
    n = len(pairs)
    return factuality_from_logprobs(logprobs[:n], tokens[:n], logprobs[n:], tokens[n:])


def held_out_perplexity(model: TextModel, texts: Sequence[str], max_tokens: int) -> tuple[float, int]:
    """(perplexity over all tokens of ``texts``, token count); each text cut to its first ``max_tokens``
    tokens and scored from an empty prompt (the model's start-of-text)."""
    cut = [model.decode(model.encode(text)[:max_tokens]) for text in texts]
    logprobs = model.logprobs([""] * len(cut), cut)
    tokens = sum(model.count_tokens(text) for text in cut)
    total = sum(logprobs)
    if not math.isfinite(total):
        raise ValueError("held-out log-likelihood is not finite")
    return perplexity(total, tokens), tokens
