"""What a learner run records for replay and audit: its consumption log and its manifest.

`RunRecord` is driven by the loop at three points: a batch was accounted (append its records to the
log), a checkpoint is about to be written (fsync the log, tell the state how many lines it covers),
and the state changed visibly (rewrite `manifest.json`). See `sipstream.runs.manifest` for the manifest's
fields and `sipstream.runs.consumption` for the log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sipstream.bus import topics as T
from sipstream.learner.checkpoint import LearnerState
from sipstream.runs import manifest as M
from sipstream.runs.consumption import LOG_NAME, ConsumptionLog


class RunRecord:
    def __init__(self, run_dir: Path, cfg: Any, lcfg: Any, bootstrap: str, state: LearnerState, *,
                 initial_sha256: str, tokenizer_sha256: str, extra: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / M.MANIFEST_NAME
        previous: dict[str, Any] = {}
        if state.step or state.log_lines:  # resumed: keep what earlier lives of this run recorded
            try:
                previous = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = {}
        self.log = ConsumptionLog(run_dir / LOG_NAME, keep_lines=state.log_lines)
        self.final_weights: dict[str, Any] | None = previous.get("learner", {}).get("final_weights")
        self.produced_before = {n: {int(p): s for p, s in e["partitions"].items()}
                                for n, e in previous.get("topics", {}).items() if e.get("role") == "produced"}
        self.data: dict[str, Any] = {
            "format": M.FORMAT, "kind": "learner", "created_at": previous.get("created_at", M.now()),
            "run_name": cfg.run_name,
            "config": {**cfg.model_dump(mode="json"), "learner": lcfg.model_dump(mode="json")},
            "code": M.code_version(),
            "seeds": {"root": cfg.seed, "torch": cfg.seed, "python": cfg.seed},
            "bus": {"bootstrap_servers": bootstrap, "topic_prefix": cfg.bus.topic_prefix},
            "models": {"policy": {"source": str(cfg.models.policy.source), "initial_sha256": initial_sha256,
                                  "tokenizer_sha256": tokenizer_sha256}},
            **(extra or {}),
        }
        if previous.get("models", {}).get("policy", {}).get("initial_sha256") not in (None, initial_sha256):
            # A resumed run whose policy source now builds other weights: keep the record honest.
            self.data["models"]["policy"]["initial_sha256_at_start"] = previous["models"]["policy"]["initial_sha256"]

    def batch(self, step: int, records: list[tuple[int, int]], trained: list[int]) -> None:
        if records:
            self.log.append(step, records, trained)

    def before_checkpoint(self, state: LearnerState) -> None:
        self.log.sync()
        state.log_lines = self.log.lines

    def published(self, version: int, step: int, sha256: str, uri: str) -> None:
        self.final_weights = {"version": version, "step": step, "sha256": sha256, "uri": uri}

    def write(self, state: LearnerState, counters: dict[str, Any], status: str, pairs_topic: str,
              produced: dict[str, dict[int, list[int]]], bus: Any) -> None:
        topics = {T.PAIRS: M.topic_entry(pairs_topic, "consumed", self.log.ranges)}
        for name in (T.WEIGHTS, T.METRICS, T.DEADLETTER):
            live = bus.topic(name)
            parts = {p: list(s) for p, s in self.produced_before.get(name, {}).items()}
            for p, (first, end) in produced.get(live, {}).items():
                span = parts.setdefault(p, [first, end])
                span[0], span[1] = min(span[0], first), max(span[1], end)
            if parts:
                topics[name] = M.topic_entry(live, "produced", parts)
        self.data.update({
            "updated_at": M.now(), "status": status, "topics": topics,
            "learner": {"algo": self.data["config"]["learner"]["algo"], "step": state.step,
                        "policy_version": state.version, "final_weights": self.final_weights,
                        "counters": {k: v for k, v in counters.items() if not k.endswith("_sum")},
                        "consumption_log": {"path": LOG_NAME, "lines": self.log.lines, "topic": T.PAIRS}},
        })
        M.write_json(self.path, self.data)

    def close(self) -> None:
        self.log.close()
