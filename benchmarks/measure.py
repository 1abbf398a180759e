"""What every benchmark section shares: timing, percentiles, profiles and the shape of a result.

A section reports *metrics* (positive numbers, each with a label and a unit), *targets* (a ratio
against a baseline measured in the same run, met or not), free-form *info* (counts that may be zero,
settings) and *notes* (what the numbers say). Numbers on a shared machine move between runs, so the
targets are always ratios of two measurements taken side by side.
"""

from __future__ import annotations

import cProfile
import io
import math
import pstats
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def best_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Fastest of `repeats` timed calls after `warmup` untimed ones (first-call caches, allocator).

    The minimum, not the mean: on a shared machine noise only ever adds time."""
    result = None
    for _ in range(warmup):
        result = run()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def interleaved_best(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, tuple[float, Any]]:
    """Like `best_seconds` for several methods, alternating them so a burst of load from other
    processes hits both sides of a ratio rather than one."""
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, run in runs.items():
            results[name] = run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: (best[name], results[name]) for name in runs}


def alternated_rounds(runs: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> list[dict[str, float]]:
    """Rates of every side, round by round: each call returns the work it did (tokens, items), timed here.

    Every round runs each side once, side by side, and the order flips from round to round, so neither
    side always follows the other (allocator, caches) and a burst of load from other processes lands on
    one round, where the round's ratio shows it, rather than on one side of a best-of-N."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    out = []
    for index in range(rounds):
        row: dict[str, float] = {}
        for name in names if index % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            work = runs[name]()
            row[name] = work / (time.perf_counter() - started)
        out.append(row)
    return out


def round_ratios(rounds: list[dict[str, float]], numerator: str, denominator: str) -> dict[str, Any]:
    """Per-round ratios of two sides' rates, their median (the figure a target is judged on: each ratio
    was measured side by side) and the best rate over the best rate (what a best-of-N would say)."""
    ratios = [row[numerator] / row[denominator] for row in rounds]
    return {"ratios": [round(r, 3) for r in ratios], "median": statistics.median(ratios),
            "low": min(ratios), "high": max(ratios),
            "best_over_best": max(r[numerator] for r in rounds) / max(r[denominator] for r in rounds)}


@contextmanager
def profiled(profile: cProfile.Profile | None) -> Iterator[None]:
    """Profile the block in the current thread (cProfile sees only the thread that enabled it)."""
    if profile is None:
        yield
        return
    profile.enable()
    try:
        yield
    finally:
        profile.disable()


def top_functions(profiles: Iterable[cProfile.Profile], limit: int = 12, sort: str = "tottime") -> list[dict[str, Any]]:
    """The functions that took the most time across profiles (e.g. one per stage thread), as rows."""
    profiles = list(profiles)
    stats = pstats.Stats(profiles[0], stream=io.StringIO())
    for extra in profiles[1:]:
        stats.add(extra)
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append({"function": f"{name} ({where}:{line})" if line else name, "calls": calls,
                     "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)})
    key = "tottime_s" if sort == "tottime" else "cumtime_s"
    return sorted(rows, key=lambda row: row[key], reverse=True)[:limit]


def torch_op_profile(call: Callable[[], Any], phases: tuple[str, ...] = (), limit: int = 10) -> dict[str, Any]:
    """One call under torch's profiler: its seconds, the seconds inside each named `record_function`
    range in `phases`, and the top operators by own CPU time (backward's kernels included, which
    cProfile folds into one `run_backward` line) as profile rows: own time in `tottime_s`, time
    including the operators it called in `cumtime_s`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        call()
        seconds = time.perf_counter() - started
    events = prof.key_averages()
    ops = sorted((e for e in events if e.key not in phases), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "seconds": seconds,
        "phases": {e.key: e.cpu_time_total / 1e6 for e in events if e.key in phases},
        "rows": [{"function": e.key, "calls": e.count, "tottime_s": round(e.self_cpu_time_total / 1e6, 3),
                  "cumtime_s": round(e.cpu_time_total / 1e6, 3)} for e in ops[:limit]],
    }


@dataclass
class Section:
    """One section's results: metrics, targets, info and notes, rendered to JSON and markdown."""

    title: str
    setup: str
    metrics: dict[str, float] = field(default_factory=dict)
    labels: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (label, unit)
    targets: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    breakdowns: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, key: str, label: str, value: float, unit: str = "") -> float:
        """Record a measured number; it must be positive (a zero rate means the measurement failed)."""
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{self.title}: {label} measured {value!r}, expected a positive number")
        self.metrics[key] = value
        self.labels[key] = (label, unit)
        return value

    def target(self, key: str, label: str, value: float, goal: float) -> bool:
        """A ratio against its baseline; higher is better, `goal` is the least acceptable value."""
        self.metric(key, label, value, "×")
        met = value >= goal
        self.targets.append({"key": key, "label": label, "value": round(value, 4), "goal": goal, "met": met})
        return met

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title, "setup": self.setup, "seconds": round(self.seconds, 1),
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "labels": {k: label for k, (label, _) in self.labels.items()},
            "units": {k: unit for k, (_, unit) in self.labels.items()},
            "targets": self.targets, "info": self.info, "notes": self.notes,
            "breakdowns": self.breakdowns, "profiles": self.profiles,
        }


def skipped(title: str, why: str) -> dict[str, Any]:
    """The JSON of a section that did not run in this mode."""
    return {"title": title, "skipped": why}


def fmt_number(value: float, unit: str = "") -> str:
    if unit == "×":
        return f"{value:.2f}×"
    if unit == "s" and value < 1:
        return f"{value * 1000:,.1f} ms"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:,.1f}"
    else:
        text = f"{value:,.3g}"
    return f"{text} {unit}".strip()
