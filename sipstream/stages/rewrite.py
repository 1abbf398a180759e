"""The rewrite stage: propose a better suffix when the original is unsafe (or, optionally, poor).

The rewriter copies a safe suffix unchanged (rewrite = null) and otherwise samples several rewrites
and keeps the best judged one only if it beats the original (small models tend to copy unsafe text
back, docs/pipeline.md). `why` records the decision so a reader of the topic can audit it.
"""

from __future__ import annotations

from collections import Counter

from sipstream.bus import topics as T
from sipstream.bus.records import Prefix, Rewritten
from sipstream.bus.runner import Stage
from sipstream.config import Config
from sipstream.models import Judge, Rewriter, RewriteRequest
from sipstream.stages.models import shared_model


class RewriteStage(Stage[Prefix, Rewritten]):
    name = "rewrite"
    input_topic = T.PREFIXES
    output_topic = T.REWRITTEN

    def __init__(self, rewriter, max_new_tokens: int | None = None) -> None:

        self.rewriter = rewriter
        self.max_new_tokens = max_new_tokens
        self.counters: Counter[str] = Counter()

    def process_batch(self, items: list[Prefix]) -> list[list[Rewritten]]:
        requests = [RewriteRequest(i["prefix"], i["suffix"], i["seed"], self.max_new_tokens) for i in items]
        out = []
        for item, result in zip(items, self.rewriter.rewrite_many(requests), strict=True):
            why = [result.why] + [f"{k}={v:.3f}" for k, v in sorted(result.flags.items())]
            self.counters["rewritten" if result.rewrite is not None else "kept_original"] += 1
            rewritten: Rewritten = {**item, "rewrite": result.rewrite, "why": why}
            out.append([rewritten])
        return out


def build(cfg: Config) -> RewriteStage:

    judge_model = shared_model(cfg.models.judge)
    rewriter_model = shared_model(cfg.models.rewriter)
    return RewriteStage(Rewriter(rewriter_model, Judge(judge_model, cfg.judge), cfg.rewriter))
