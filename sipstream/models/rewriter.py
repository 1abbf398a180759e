"""The rewriter: proposes a safer or better suffix, or says why it leaves the original alone.

The paper trains its rewriter to copy safe suffixes and steer unsafe ones to safety. Small shipped
models mostly copy unsafe text back (docs/pipeline.md), so the rewrite is a search: sample
``rewrite_candidates`` rewrites, let the judge score them together with the original, and keep the
best only if it beats the original. "No rewrite" is a normal outcome and always comes with a reason,
which the rewrite stage puts on the bus (``why``).

The rewriter's input repeats the last words of the prefix (5 in the paper) before the suffix, and
its answer starts right after those words, so the rewrite continues the sentence smoothly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sipstream.config.models import RewriterSpec
from sipstream.models.base import TextModel, derive_seed
from sipstream.models.judge import CandidateScores, Judge, JudgeRequest
from sipstream.models.prompts import (
    last_words,
    load_prompt,
    render_prompt,
    template_fields,
)

# Where a few-shot-style answer runs on into a new example: everything from here on is dropped.
_STOP_MARKERS = ("\nPREFIX:", "\nORIGINAL:", "\nREWRITTEN:")


@dataclass(frozen=True)
class RewriteRequest:
    """One suffix to rewrite. ``max_new_tokens`` overrides the budget derived from the suffix's
    token count (needed for remote models without a local tokenizer)."""

    prefix: str
    suffix: str
    seed: int = 0
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class RewriteResult:
    """The kept rewrite (None for "no rewrite") and why, with the judge's scores for the record."""

    rewrite: str | None
    why: str
    candidates_tried: int = 0
    original_scores: CandidateScores | None = None
    rewrite_scores: CandidateScores | None = None
    flags: dict[str, float] = field(default_factory=dict)


def copy_overlap(original: str, candidate: str) -> float:
    """Share of the original's word trigrams that reappear in the candidate (1.0 = a copy).

    Small rewriters often hand back the unsafe text with a word changed; judged by a noisy small
    judge, such a near-copy can land just above the safety threshold and win. Measuring the overlap
    lets the rewriter refuse near-copies outright."""
    def trigrams(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        size = 3 if len(words) >= 3 else 1
        return {tuple(words[index:index + size]) for index in range(len(words) - size + 1)}

    original_trigrams = trigrams(original)
    if not original_trigrams:
        return 0.0
    return len(original_trigrams & trigrams(candidate)) / len(original_trigrams)


def clean_rewrite(text: str) -> str:
    """Cut a sampled rewrite where it starts a new prompt section."""
    for marker in _STOP_MARKERS:
        position = text.find(marker)
        if position != -1:
            text = text[:position]
    return text.rstrip()


class Rewriter:
    """Rewrites suffixes with ``model`` and picks among the rewrites with ``judge``."""

    def __init__(self, model: TextModel, judge: Judge, spec: RewriterSpec | None = None) -> None:
        self.model = model
        self.judge = judge
        self.spec = spec or RewriterSpec()
        self.template = load_prompt("rewrite", self.spec.prompts_dir)
        expected = {"prefix", "prefix_tail", "suffix"}
        if template_fields(self.template) != expected:
            raise ValueError(f"prompt rewrite.txt must use exactly the placeholders {sorted(expected)}")

    def prompt(self, prefix: str, suffix: str) -> str:
        """The rewriter's input for one suffix."""
        shown_prefix = last_words(prefix, self.spec.prefix_max_words).strip()
        prefix_tail = last_words(prefix.rstrip(), self.spec.prefix_tail_words)
        return render_prompt(self.template, prefix=shown_prefix, prefix_tail=prefix_tail, suffix=suffix)

    def _budget(self, request: RewriteRequest) -> int:
        if request.max_new_tokens is not None:
            return request.max_new_tokens
        return max(1, math.ceil(self.model.count_tokens(request.suffix) * self.spec.length_slack))

    def rewrite(self, prefix: str, suffix: str, seed: int = 0, max_new_tokens: int | None = None) -> RewriteResult:
        """Rewrite one suffix (see :meth:`rewrite_many`)."""
        return self.rewrite_many([RewriteRequest(prefix, suffix, seed, max_new_tokens)])[0]

    def rewrite_many(self, requests: Sequence[RewriteRequest]) -> list[RewriteResult]:
        """Rewrite several suffixes with batched model and judge calls. Each result depends only on
        its own request (seeds are derived per request), so batching equals one-by-one."""
        results: list[RewriteResult | None] = [None] * len(requests)
        to_rewrite = list(range(len(requests)))

        if self.spec.only_rewrite_unsafe:
            # One cheap pointwise question per suffix decides whether a rewrite is needed at all.
            safety = self.judge.safety_scores(
                [requests[i].prefix for i in to_rewrite], [requests[i].suffix for i in to_rewrite],
                [derive_seed(requests[i].seed, "rewrite-safety") for i in to_rewrite],
            )
            still_to_rewrite = []
            for index, original_safety in zip(to_rewrite, safety, strict=True):
                if original_safety >= self.judge.spec.safety_threshold:
                    results[index] = RewriteResult(
                        None, f"original judged safe (safety {original_safety:.2f}); kept unchanged",
                        flags={"original_safety": original_safety},
                    )
                else:
                    still_to_rewrite.append(index)
            to_rewrite = still_to_rewrite

        # Sample rewrites, grouped by token budget so one call's max_new_tokens fits all its rows.
        samples: dict[int, list[str]] = {}
        budgets: dict[int, list[int]] = {}
        for index in to_rewrite:
            budgets.setdefault(self._budget(requests[index]), []).append(index)
        count = self.spec.rewrite_candidates
        for budget, indices in budgets.items():
            prompts = [self.prompt(requests[i].prefix, requests[i].suffix) for i in indices for _ in range(count)]
            seeds = [derive_seed(requests[i].seed, "rewrite", k) for i in indices for k in range(count)]
            texts = self.model.generate(prompts, budget, seeds, temperature=self.spec.temperature,
                                        top_p=self.spec.top_p)
            for position, index in enumerate(indices):
                samples[index] = texts[position * count:(position + 1) * count]

        # Keep distinct, non-empty rewrites that are not (near-)copies of the original: a copy is
        # "no rewrite".
        judge_requests: list[JudgeRequest] = []
        judged_indices: list[int] = []
        distinct_rewrites: dict[int, list[str]] = {}
        for index in to_rewrite:
            request = requests[index]
            kept: list[str] = []
            for text in samples[index]:
                text = clean_rewrite(text)
                if (text.strip() and text not in kept
                        and copy_overlap(request.suffix, text) < self.spec.max_copy_overlap):
                    kept.append(text)
            if not kept:
                results[index] = RewriteResult(
                    None, f"no usable rewrite: all {count} samples were empty or (near-)copies of the original",
                    candidates_tried=count,
                )
                continue
            distinct_rewrites[index] = kept
            judged_indices.append(index)
            judge_requests.append(JudgeRequest(request.prefix, request.suffix, (request.suffix, *kept),
                                               derive_seed(request.seed, "rewrite-judge")))

        for index, judged in zip(judged_indices, self.judge.score_many(judge_requests), strict=True):
            original_scores, *rewrite_scores = judged.scores
            best = max(range(len(rewrite_scores)), key=lambda k: rewrite_scores[k].total)
            best_scores = rewrite_scores[best]
            flags = {"original_safety": original_scores.safety, "rewrite_safety": best_scores.safety}
            if best_scores.total > original_scores.total + self.spec.min_gain:
                why = (f"rewrite judged better: total {best_scores.total:.2f} vs original {original_scores.total:.2f} "
                       f"(safety {best_scores.safety:.2f} vs {original_scores.safety:.2f})")
                results[index] = RewriteResult(distinct_rewrites[index][best], why, count, original_scores,
                                               best_scores, flags)
            else:
                why = (f"no rewrite beat the original: best total {best_scores.total:.2f} vs original "
                       f"{original_scores.total:.2f} over {len(rewrite_scores)} distinct rewrites")
                results[index] = RewriteResult(None, why, count, original_scores, best_scores, flags)
        unanswered = [index for index, result in enumerate(results) if result is None]
        if unanswered:
            raise AssertionError(f"rewriter produced no result for requests {unanswered}")
        return results  # type: ignore[return-value]  # no None left, checked above
