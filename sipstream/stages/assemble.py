"""The assemble stage: judged candidates → training examples.

Online DPO (paper): the highest-scoring candidate is *chosen*, the lowest *rejected*; a pair is made
only when chosen beats rejected by more than `pairs.margin` (default 0, so exact ties give no pair).
Reward-filtered NLL: the single best candidate is the *target* when its total reaches
`pairs.nll_min_total`. The pretrain baseline trains on the original suffix, which every record carries.
Candidates the policy did not write (original, rewrite) compete on the same scores as its rollouts.
"""

from __future__ import annotations

from collections import Counter

from sipstream.bus import topics as T
from sipstream.bus.dedupe import SeenIds
from sipstream.bus.records import Candidate, CandidateKind, Judged, Pair, Rollouts
from sipstream.bus.runner import Stage
from sipstream.config import Config, PairsConfig


def candidate_texts(item: Rollouts) -> dict[tuple[CandidateKind, int], str]:
    """(kind, index) → text, in a fixed order: original, rewrite, rollouts."""
    texts: dict[tuple[CandidateKind, int], str] = {("original", 0): item["suffix"]}
    rewrite = item.get("rewrite")
    if rewrite is not None:
        texts[("rewrite", 0)] = rewrite
    for i, rollout in enumerate(item.get("rollouts", [])):
        texts[("rollout", i)] = rollout
    return texts


class AssembleStage(Stage[Judged, Pair]):
    name = "assemble"
    input_topic = T.JUDGED
    output_topic = T.PAIRS

    def __init__(self, pairs: PairsConfig) -> None:
        self.pairs = pairs
        self.counters: Counter[str] = Counter()
        # At-least-once upstream can deliver an item twice; one pair per item is enough.
        self.seen = SeenIds()

    def process(self, item: Judged) -> list[Pair]:
        if not self.seen.first_time(item["item_id"]):
            self.counters["duplicates"] += 1
            return []
        texts = candidate_texts(item)
        ranked = []
        for order, score in enumerate(item["scores"]):
            key = (score["kind"], score["index"])
            if key not in texts:
                raise ValueError(f"score for unknown candidate {key} in item {item['item_id']}")
            ranked.append((score["total"], -order, key))
        if not ranked:
            raise ValueError(f"item {item['item_id']} has no scored candidates")
        # Ties on total resolve by candidate order (original, rewrite, rollouts): deterministic on replay.
        ranked.sort(reverse=True)
        best, worst = ranked[0], ranked[-1]

        def candidate(entry: tuple[float, int, tuple[CandidateKind, int]]) -> Candidate:
            total, _, (kind, index) = entry
            return Candidate(kind=kind, index=index, text=texts[(kind, index)], total=total)

        chosen = rejected = None
        why: list[str] = []
        if texts[best[2]] == texts[worst[2]]:
            why.append("no pair: best and worst candidates have the same text")
        elif best[0] - worst[0] <= self.pairs.margin:
            why.append(f"no pair: best total {best[0]:.4f} - worst {worst[0]:.4f} <= margin {self.pairs.margin}")
        else:
            chosen, rejected = candidate(best), candidate(worst)
            self.counters[f"chosen.{chosen['kind']}"] += 1
            self.counters[f"rejected.{rejected['kind']}"] += 1
        if chosen is None:
            self.counters["no_pair"] += 1
        threshold = self.pairs.nll_min_total
        target = candidate(best) if threshold is None or best[0] >= threshold else None
        if target is None:
            why.append(f"no target: best total {best[0]:.4f} < nll_min_total {threshold}")
        self.counters[f"target.{target['kind']}" if target else "no_target"] += 1
        return [
            Pair(
                item_id=item["item_id"],
                doc_id=item["doc_id"],
                prefix=item["prefix"],
                suffix=item["suffix"],
                seed=item["seed"],
                policy_version=item["policy_version"],
                chosen=chosen,
                rejected=rejected,
                target=target,
                why=why,
            )
        ]


def build(cfg: Config) -> AssembleStage:
    return AssembleStage(cfg.pairs)
