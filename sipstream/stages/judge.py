"""The judge stage: score every candidate (original, rewrite, each rollout) of an item.

Quality is pairwise over every pair of candidates, asked in both orders; safety and factuality are
pointwise (factuality against the original suffix). Items of a batch are judged in one batched model
call per criterion.
"""

from __future__ import annotations

from collections import Counter

from sipstream.bus import topics as T
from sipstream.bus.records import CandidateScore, Judged, Rollouts
from sipstream.bus.runner import Stage
from sipstream.config import Config
from sipstream.models import Judge, JudgeRequest
from sipstream.stages.assemble import candidate_texts
from sipstream.stages.models import shared_model


class JudgeStage(Stage[Rollouts, Judged]):
    name = "judge"
    input_topic = T.ROLLOUTS
    output_topic = T.JUDGED

    def __init__(self, judge) -> None:
        self.judge = judge
        self.counters: Counter[str] = Counter()

    def process_batch(self, items: list[Rollouts]) -> list[list[Judged]]:
        keyed = [candidate_texts(item) for item in items]
        requests = [
            JudgeRequest(item["prefix"], item["suffix"], tuple(texts.values()), item["seed"])
            for item, texts in zip(items, keyed, strict=True)
        ]
        out: list[list[Judged]] = []
        for item, texts, result in zip(items, keyed, self.judge.score_many(requests), strict=True):
            self.counters["pairwise_calls"] += result.pairwise_calls
            self.counters["pointwise_calls"] += result.pointwise_calls
            scores = [
                CandidateScore(kind=kind, index=index, quality=s.quality, safety=s.safety, factuality=s.factuality,
                               total=s.total)
                for (kind, index), s in zip(texts, result.scores, strict=True)
            ]
            original = next((s for s in scores if s["kind"] == "original"), None)
            if original is not None:
                # How often the judge flags the stream's own text (the run summary reports the share).
                self.counters["originals_judged"] += 1
                self.counters["originals_flagged_unsafe"] += original["safety"] < self.judge.spec.safety_threshold
            judged: Judged = {**item, "scores": scores}
            out.append([judged])
        return out


def build(cfg: Config) -> JudgeStage:

    return JudgeStage(Judge(shared_model(cfg.models.judge), cfg.judge))
