"""What a report reads from a run directory, turned into plain data (dicts and lists).

A run directory written by `sipstream run` holds summary.json, manifest.json, config.yaml, logs/ and
export/<topic>/partition-N.jsonl (one archived record per line; its `value` is the record's JSON text).
Older run directories lack some of these (sip.metrics and sip.deadletter were archived later), so every
reader returns None for "not there" and the report says so instead of failing. Everything below
`read_*`/`load_*` is a pure function of plain data, reusable by experiment code.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from sipstream.errors import UserError

CHOSEN_KINDS = ("original", "rewrite", "rollout")
EVAL_FILE = "eval.json"
RUN_MARKERS = ("summary.json", "manifest.json", "config.yaml", "export")


# --- reading the run directory -------------------------------------------------------------------

def check_run_dir(run_dir: Path) -> None:
    """A report needs at least one of the files `sipstream run` writes; anything else is a user mistake."""
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not any((run_dir / marker).exists() for marker in RUN_MARKERS):
        raise UserError(f"{run_dir} is not a run directory (no summary.json, manifest.json, config.yaml or export/ "
                        "in it); pass a directory that `sipstream run` printed")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing or unreadable (a partial run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config: config.yaml, else the copy in manifest.json."""

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(data, dict):
            return data
    except (OSError, yaml.YAMLError):
        pass
    manifest = read_json(run_dir / "manifest.json") or {}
    return manifest.get("config") if isinstance(manifest.get("config"), dict) else None


def _archived_rows(folder: Path) -> list[dict[str, Any]]:
    """The raw rows of every partition file, JSONL (`value` is text) or Parquet (`value` is bytes)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("partition-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    rows.append({})  # counted as unreadable below
    parquet = sorted(folder.glob("partition-*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        for path in parquet:
            rows.extend(pq.read_table(path).to_pylist())
    return rows


def read_topic(run_dir: Path, topic: str) -> tuple[list[dict[str, Any]], int] | None:
    """The archived records of `topic` in produce order, with their parsed values, and how many rows
    could not be parsed; None when the run did not archive the topic.

    Each record is {"partition", "offset", "timestamp", "value": dict}. An empty folder is an archived
    topic with no records (e.g. no dead letters), not a missing one."""
    folder = run_dir / "export" / topic
    if not folder.is_dir():
        return None
    records, unreadable = [], 0
    for row in _archived_rows(folder):
        try:
            value = json.loads(row["value"])  # a non-UTF-8 value is archived as value_b64, value null: not ours
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if not isinstance(value, dict):
            unreadable += 1
            continue
        records.append({"partition": row.get("partition"), "offset": row.get("offset"),
                        "timestamp": row.get("timestamp") or 0, "value": value})
    records.sort(key=lambda r: (r["timestamp"], r["partition"] or 0, r["offset"] or 0))
    return records, unreadable


def find_eval_files(run_dir: Path) -> list[Path]:
    """Every eval.json under RUN_DIR/eval/ (written by `sipstream eval --out`)."""
    root = run_dir / "eval"
    return sorted(root.rglob(EVAL_FILE)) if root.is_dir() else []


# --- sip.pairs: reward and curriculum ------------------------------------------------------------

def _mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def reward_by_version(pairs: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per policy_version: mean judged total of the chosen and the rejected candidate (with standard errors),
    the number of pairs and of items that made no pair (a tie, or under `pairs.margin`)."""
    chosen: dict[int, list[float]] = defaultdict(list)
    rejected: dict[int, list[float]] = defaultdict(list)
    no_pair: Counter[int] = Counter()
    for pair in pairs:
        version = int(pair.get("policy_version", 0))
        if pair.get("chosen") and pair.get("rejected"):
            chosen[version].append(float(pair["chosen"]["total"]))
            rejected[version].append(float(pair["rejected"]["total"]))
        else:
            no_pair[version] += 1
    out: dict[int, dict[str, float]] = {}
    for version in sorted(set(chosen) | set(no_pair)):
        row: dict[str, float] = {"pairs": len(chosen[version]), "no_pair": no_pair[version]}
        if chosen[version]:
            row["chosen"], row["chosen_sem"] = _mean_sem(chosen[version])
            row["rejected"], row["rejected_sem"] = _mean_sem(rejected[version])
        out[version] = row
    return out


def chosen_counts_by_version(pairs: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Per policy_version: how many chosen candidates were the original suffix, a rewrite or a rollout."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for pair in pairs:
        if pair.get("chosen"):
            counts[int(pair.get("policy_version", 0))][pair["chosen"]["kind"]] += 1
    return {v: {k: counts[v][k] for k in CHOSEN_KINDS} | {k: n for k, n in counts[v].items() if k not in CHOSEN_KINDS}
            for v in sorted(counts)}


def shares(counts_by_version: dict[int, dict[str, int]]) -> dict[int, dict[str, float]]:
    """Counts → shares that sum to 1 per version (the paper's curriculum: rollouts' share rises)."""
    out = {}
    for version, counts in counts_by_version.items():
        total = sum(counts.values())
        if total:
            out[version] = {kind: n / total for kind, n in counts.items()}
    return out


# --- sip.metrics: learner curves and per-process counters ----------------------------------------

LEARNER_FIELDS = ("loss", "reward_margin", "reward_accuracy", "grad_norm", "lr", "tokens_per_s",
                  "step_tokens_per_s", "policy_lag", "policy_version")


def learner_series(metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One point per optimizer step from the learner's periodic metrics, sorted by step.

    The learner publishes every `runner.metrics_interval_s`, carrying the gauges of its latest step, so
    a step can appear several times (the last wins) and fast runs skip steps: this is a sample of the
    curve, not every step."""
    by_step: dict[int, dict[str, float]] = {}
    for value in metrics:
        gauges = value.get("gauges") or {}
        if value.get("source") != "learner" or gauges.get("step") is None or gauges.get("loss") is None:
            continue
        point = {"step": int(gauges["step"])}
        point.update({k: float(gauges[k]) for k in LEARNER_FIELDS if isinstance(gauges.get(k), (int, float))})
        by_step[point["step"]] = point
    return [by_step[s] for s in sorted(by_step)]


def process_totals(metrics: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per process (source): its counters at their last report, summed over instances (workers), plus
    the number of instances seen. Counters are cumulative per instance, so the last report is the total."""
    last: dict[tuple[str, str], dict[str, float]] = {}
    for value in metrics:
        source, instance = value.get("source"), value.get("instance")
        if source is None:
            continue
        last[(source, str(instance))] = {k: float(v) for k, v in (value.get("counters") or {}).items()
                                         if isinstance(v, (int, float))}
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (source, _), counters in sorted(last.items()):
        totals[source]["instances"] += 1
        for name, v in counters.items():
            if name != "stage.policy_version":  # a gauge filed under counters: summing it means nothing
                totals[source][name] += v
    return {source: dict(c) for source, c in totals.items()}


# --- sip.deadletter and sip.weights --------------------------------------------------------------

def deadletter_reasons(deadletters: list[dict[str, Any]], top: int = 10) -> list[dict[str, Any]]:
    """The most frequent (stage, reason) pairs, with a count and the latest error message as an example."""
    counts: Counter[tuple[str, str]] = Counter()
    example: dict[tuple[str, str], str] = {}
    for value in deadletters:
        key = (str(value.get("stage", "?")), str(value.get("reason", "?")))
        counts[key] += 1
        example[key] = str(value.get("error", ""))
    return [{"stage": s, "reason": r, "count": n, "example": example[(s, r)]} for (s, r), n in counts.most_common(top)]


def published_versions(weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per published policy version: version, step, created_at, uri (last announcement wins)."""
    rows = {}
    for value in weights:
        if "version" in value:
            rows[int(value["version"])] = {k: value.get(k) for k in ("version", "step", "created_at", "uri", "algo")}
    return [rows[v] for v in sorted(rows)]


# --- eval.json files -----------------------------------------------------------------------------

_AT_VERSION = re.compile(r"@(\d+)$")
_WEIGHTS_FILE = re.compile(r"v(\d+)\.safetensors$")


def eval_policy_version(model: str, versions: list[dict[str, Any]]) -> int | None:
    """The policy version an eval measured: "start" (the untrained policy) is 0, "RUN_DIR@N" is N, else a
    weights file the run announced, else the weight store's file name (vNNNNNNNN.safetensors); None for
    anything else (e.g. another model)."""
    model = str(model or "")
    if model == "start":
        return 0
    found = _AT_VERSION.search(model)
    if found:
        return int(found.group(1))
    name = Path(model.removeprefix("file://")).name
    for row in versions:
        if row.get("uri") and Path(str(row["uri"]).removeprefix("file://")).name == name and name:
            return int(row["version"])
    found = _WEIGHTS_FILE.search(model)
    return int(found.group(1)) if found else None


def load_evals(run_dir: Path, versions: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable eval.json with `_path` (relative to the run) and `_version` added, oldest first;
    and one note per file that could not be read."""
    evals, notes = [], []
    for path in find_eval_files(run_dir):
        data = read_json(path)
        rel = str(path.relative_to(run_dir))
        if data is None or not isinstance(data.get("win_rate") or {}, dict):
            notes.append(f"{rel} is not a readable eval result; skipped")
            continue
        data["_path"] = rel
        # A bare run directory means its latest weights: `model_resolved` names the file they came from.
        version = eval_policy_version(data.get("model", ""), versions)
        if version is None and data.get("model_resolved"):
            version = eval_policy_version(data["model_resolved"], versions)
        data["_version"] = version
        evals.append(data)
    evals.sort(key=lambda e: (str(e.get("created_at") or ""), e["_path"]))
    return evals, notes


def evals_by_version(evals: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The latest eval per policy version (evals whose version is unknown are left out)."""
    out: dict[int, dict[str, Any]] = {}
    for data in evals:  # oldest first: later ones replace earlier ones
        if data.get("_version") is not None:
            out[int(data["_version"])] = data
    return dict(sorted(out.items()))

