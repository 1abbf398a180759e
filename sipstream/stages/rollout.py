"""The rollout stage: the policy samples `rollouts` continuations of each prefix.

Each rollout gets as many new tokens as the original suffix has, at temperature 1.0 / top_p 1.0 by
default (paper). Items of a batch are sampled together, grouped by length. Seeds derive from the item's
seed, the policy version and the rollout index, so a replay on the same weights samples the same text.
New weights announced on `sip.weights` are loaded between batches (sha256 checked; a bad file is
refused and the current version keeps serving), and every output is tagged with `policy_version`. An
announcement is read with the one parser, `parse_weights_announcement`; one it rejects is logged,
counted (`weights_invalid`) and ignored.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from sipstream.bus import topics as T
from sipstream.bus.records import Rewritten, Rollouts, WeightsAnnouncement, parse_weights_announcement
from sipstream.bus.runner import Item, Stage
from sipstream.config import Config, RolloutConfig
from sipstream.models import ModelError, derive_seed
from sipstream.stages.models import shared_model
from sipstream.telemetry.logs import get_logger


class RolloutStage(Stage[Rewritten, Rollouts]):
    name = "rollout"
    input_topic = T.REWRITTEN
    output_topic = T.ROLLOUTS
    control_topics = (T.WEIGHTS,)

    def __init__(self, policy: Any, rollout: RolloutConfig, run_name: str) -> None:
        self.policy = policy
        self.rollout = rollout
        self.run_name = run_name
        self.policy_version = 0
        self._pending: WeightsAnnouncement | None = None
        self.counters: Counter[str] = Counter()
        self.log = get_logger(stage=self.name)

    def on_control(self, topic: str, value: Item) -> None:
        try:
            announcement = parse_weights_announcement(value)
        except ValueError as exc:
            self.counters["weights_invalid"] += 1
            self.log.error("weights announcement ignored", policy_version=self.policy_version, error=str(exc))
            return
        if announcement["run_name"] == self.run_name and announcement["version"] > max(
            self.policy_version, self._pending["version"] if self._pending else -1
        ):
            self._pending = announcement  # only the newest matters; loaded between batches

    def before_batch(self) -> None:
        announcement, self._pending = self._pending, None
        if announcement is None:
            return

        try:
            self.policy.load_weights(announcement["uri"], announcement["sha256"], version=str(announcement["version"]))
        except (ModelError, OSError, ValueError) as exc:
            self.counters["weights_refused"] += 1
            self.log.error("new weights refused; keeping the current version", policy_version=self.policy_version,
                           refused_version=announcement["version"], uri=announcement["uri"], error=str(exc))
            return
        self.log.info("policy weights swapped", old_version=self.policy_version, policy_version=announcement["version"])
        self.policy_version = announcement["version"]
        self.counters["weights_loaded"] += 1

    def stage_counters(self) -> dict[str, float]:
        return {**self.counters, "policy_version": self.policy_version}

    def process_batch(self, items: list[Rewritten]) -> list[list[Rollouts]]:
        k = self.rollout.rollouts
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_length[max(1, self.policy.count_tokens(item["suffix"]))].append(index)
        samples: dict[int, list[str]] = {}
        for length, indices in by_length.items():
            prompts = [items[i]["prefix"] for i in indices for _ in range(k)]
            seeds = [derive_seed(items[i]["seed"], self.policy_version, r) % (2**63) for i in indices for r in range(k)]
            texts = self.policy.generate(prompts, length, seeds, self.rollout.temperature, self.rollout.top_p) if prompts else []
            for position, index in enumerate(indices):
                samples[index] = texts[position * k : (position + 1) * k]
        self.counters["rollouts"] += k * len(items)
        out: list[list[Rollouts]] = []
        for i, item in enumerate(items):
            rollouts: Rollouts = {**item, "rollouts": samples[i], "policy_version": self.policy_version}
            out.append([rollouts])
        return out


def build(cfg: Config) -> RolloutStage:

    return RolloutStage(shared_model(cfg.models.policy), cfg.rollout, cfg.run_name)
