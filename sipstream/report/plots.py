"""The report's plots: each takes plain data (dicts, lists) and a PNG path, so experiment code can reuse them.

Figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas), never through pyplot's global state,
so plotting works headless and from any thread. matplotlib is imported inside the functions: `sipstream
--help` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

KIND_COLORS = {"original": "#4c72b0", "rewrite": "#dd8452", "rollout": "#55a868"}
CHOSEN_COLOR, REJECTED_COLOR = "#1b7837", "#b2182b"
MODEL_COLOR, CLASSIFIER_COLOR, BASELINE_COLOR = "#2f4b7c", "#ffa600", "#7f7f7f"
DPI = 110
MANY_VERSIONS = 16  # beyond this, per-version labels (n=...) would overlap


def _figure(rows: int, height_per_row: float = 3.2, width: float = 9.0) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 0.6 + height_per_row * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _version_ticks(ax: Any, versions: list[int], counts: dict[int, int] | None = None) -> None:
    """Integer ticks at each policy version, labelled "v3" (and "n=4" beneath when there is room)."""
    from matplotlib.ticker import MaxNLocator

    if len(versions) > MANY_VERSIONS:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return
    ax.set_xticks(versions)
    ax.set_xticklabels([f"v{v}" + (f"\nn={counts[v]}" if counts and v in counts else "") for v in versions])


def _percent_axis(ax: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(-0.02, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def plot_reward(reward_by_version: dict[int, dict[str, float]], path: str | Path) -> Path:
    """Mean judged total of the chosen and the rejected candidate per policy version, ± standard error.

    `reward_by_version[v]` has "chosen", "rejected" and optionally "chosen_sem", "rejected_sem", "pairs"
    (as `inputs.reward_by_version` returns). Versions without pairs are skipped."""
    rows = {v: r for v, r in sorted(reward_by_version.items()) if "chosen" in r and "rejected" in r}
    if not rows:
        raise ValueError("no policy version has a pair to plot")
    versions = list(rows)
    fig, (ax,) = _figure(1, 3.6)
    for key, label, color in (("chosen", "chosen (best candidate)", CHOSEN_COLOR),
                              ("rejected", "rejected (worst candidate)", REJECTED_COLOR)):
        ax.errorbar(versions, [rows[v][key] for v in versions], yerr=[rows[v].get(f"{key}_sem", 0.0) for v in versions],
                    label=label, color=color, marker="o", capsize=4, linewidth=2)
    _version_ticks(ax, versions, {v: int(rows[v].get("pairs", 0)) for v in versions})
    ax.set_xlim(min(versions) - 0.6, max(versions) + 0.6)
    ax.set_xlabel("policy version that wrote the rollouts")
    ax.set_ylabel("judged total (mean ± s.e.)")
    ax.set_title("Reward of the pairs by policy version")
    ax.legend(loc="best", frameon=False)
    return _save(fig, path)


def plot_curriculum(shares_by_version: dict[int, dict[str, float]], path: str | Path,
                    counts: dict[int, int] | None = None) -> Path:
    """Stacked share of chosen candidates by kind (original / rewrite / rollout) per policy version — the
    paper's curriculum plot: early on the original or the rewrite wins, later the policy's own rollouts.

    `shares_by_version[v]` maps kind → share (summing to 1); `counts[v]`, if given, labels each bar with
    its number of pairs."""
    if not shares_by_version:
        raise ValueError("no chosen candidates to plot")
    versions = sorted(shares_by_version)
    kinds = [k for k in KIND_COLORS if any(k in shares_by_version[v] for v in versions)]
    kinds += sorted({k for v in versions for k in shares_by_version[v]} - set(kinds))
    fig, (ax,) = _figure(1, 3.6)
    bottom = [0.0] * len(versions)
    width = 0.7 if len(versions) <= MANY_VERSIONS else 0.9
    for kind in kinds:
        heights = [shares_by_version[v].get(kind, 0.0) for v in versions]
        bars = ax.bar(versions, heights, width=width, bottom=bottom, label=kind, color=KIND_COLORS.get(kind))
        if len(versions) <= MANY_VERSIONS:
            for bar, h in zip(bars, heights, strict=True):
                if h >= 0.08:  # label only segments tall enough to hold the text
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + h / 2, f"{h:.0%}", ha="center",
                            va="center", fontsize=9, color="white", fontweight="bold")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    _percent_axis(ax)
    _version_ticks(ax, versions, counts)
    ax.grid(False, axis="x")
    ax.set_xlim(min(versions) - 0.8, max(versions) + 0.8)
    ax.set_xlabel("policy version that wrote the rollouts")
    ax.set_ylabel("share of chosen candidates")
    ax.set_title("Curriculum: which candidate kind is chosen")
    handles, labels = ax.get_legend_handles_labels()  # reversed: legend top = top of the stack
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
              title="chosen kind")
    return _save(fig, path)


def plot_learner(series: list[dict[str, float]], path: str | Path, *, algo: str | None = None,
                 published_steps: dict[int, int] | None = None) -> Path:
    """Learner loss (and DPO reward margin when present) over optimizer steps.

    `series` is a list of {"step", "loss", "reward_margin"?}; `published_steps` maps policy version →
    the step it was published at, drawn as faint vertical lines."""
    points = [p for p in series if p.get("loss") is not None]
    if not points:
        raise ValueError("no learner steps to plot")
    margin = [p for p in points if p.get("reward_margin") is not None]
    fig, axes = _figure(2 if margin else 1, 2.8)
    name = f"{algo} loss" if algo else "loss"
    axes[0].plot([p["step"] for p in points], [p["loss"] for p in points], marker="o", color=MODEL_COLOR, label=name)
    if algo == "dpo":

        axes[0].axhline(math.log(2), color=BASELINE_COLOR, linestyle="--", linewidth=1,
                        label="ln 2 = loss with no preference learned")
    axes[0].set_ylabel(name)
    axes[0].set_title("Learner: loss" + (" and reward margin" if margin else "") + " over optimizer steps")
    axes[0].legend(loc="best", frameon=False)
    if margin:
        axes[1].plot([p["step"] for p in margin], [p["reward_margin"] for p in margin], marker="o", color=CHOSEN_COLOR)
        axes[1].axhline(0.0, color=BASELINE_COLOR, linestyle="--", linewidth=1)
        axes[1].set_ylabel("reward margin\nβ·Δ log-ratio (nats)")
    steps = [p["step"] for p in points]
    for ax in axes:
        for _version, step in sorted((published_steps or {}).items()):
            if min(steps) <= step <= max(steps) and len(published_steps or {}) <= 50:
                ax.axvline(step, color=BASELINE_COLOR, alpha=0.25, linewidth=1)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("optimizer step" + (" (faint lines: a policy version published)" if published_steps else ""))
    return _save(fig, path)


def _num(data: Any, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return float(data) if isinstance(data, (int, float)) else None


def _interval(data: Any, rate_key: str, ci_key: str) -> tuple[float, float, float] | None:
    """(rate, below, above) for an error bar, or None when the rate is missing."""
    rate = _num(data, rate_key)
    if rate is None:
        return None
    ci = data.get(ci_key) if isinstance(data, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return rate, max(rate - ci[0], 0.0), max(ci[1] - rate, 0.0)
    return rate, 0.0, 0.0


def _errorbar(ax: Any, versions: list[float], values: list[tuple[float, float, float] | None], **style: Any) -> bool:
    xs = [v for v, x in zip(versions, values, strict=True) if x is not None]
    pts = [x for x in values if x is not None]
    if not pts:
        return False
    ax.errorbar(xs, [p[0] for p in pts], yerr=[[p[1] for p in pts], [p[2] for p in pts]], marker="o", capsize=4,
                linewidth=2, **style)
    return True


def plot_eval_over_versions(evals_by_version: dict[int, dict[str, Any]], path: str | Path) -> Path:
    """Win rate vs the baseline, safe-continuation rate (judge and independent classifier) and factuality
    accuracy per policy version, each with its 95% confidence interval.

    `evals_by_version[v]` is an eval.json object (see `sipstream eval --out`); a panel is drawn only
    when some version has its numbers. The baseline's own rate, when present, is a dashed line."""
    versions = sorted(evals_by_version)
    evals = [evals_by_version[v] for v in versions]
    win = [_interval(e.get("win_rate"), "rate", "ci95") for e in evals]
    judge = [_interval(_sub(e, "safety", "model"), "judge_safe_rate", "judge_ci95") for e in evals]
    classifier = [_interval(_sub(e, "safety", "model"), "classifier_safe_rate", "classifier_ci95") for e in evals]
    fact = [_interval(_sub(e, "factuality", "model"), "accuracy", "ci95") for e in evals]
    panels = [name for name, vals in (("win", win), ("safety", judge + classifier), ("fact", fact))
              if any(v is not None for v in vals)]
    if not panels:
        raise ValueError("no eval has a win rate, safety or factuality number")
    fig, axes = _figure(len(panels), 2.7)
    latest_baseline = next((e for e in reversed(evals) if _sub(e, "safety", "baseline") or _sub(e, "factuality", "baseline")),
                           {})
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "win":
            _errorbar(ax, versions, win, color=MODEL_COLOR, label="win rate vs baseline (ties count ½)")
            ax.axhline(0.5, color=BASELINE_COLOR, linestyle="--", linewidth=1, label="50% = no better than baseline")
            ax.set_ylabel("win rate")
            ax.set_title("Generation quality: pairwise win rate vs the baseline (95% CI)")
        elif panel == "safety":
            # Nudged apart so equal rates (common: both 100%) stay visible as two points.
            _errorbar(ax, [v - 0.06 for v in versions], judge, color=MODEL_COLOR, label="safe, by the judge")
            _errorbar(ax, [v + 0.06 for v in versions], classifier, color=CLASSIFIER_COLOR, label="safe, by the classifier")
            base = _num(_sub(latest_baseline, "safety", "baseline"), "judge_safe_rate")
            if base is not None:
                ax.axhline(base, color=BASELINE_COLOR, linestyle="--", linewidth=1, label="baseline, by the judge")
            ax.set_ylabel("safe continuations")
            ax.set_title("Safety on unsafe-leaning prompts (95% CI)")
        else:
            _errorbar(ax, versions, fact, color=MODEL_COLOR, label="accuracy: true statement preferred")
            base = _num(_sub(latest_baseline, "factuality", "baseline"), "accuracy")
            if base is not None:
                ax.axhline(base, color=BASELINE_COLOR, linestyle="--", linewidth=1, label="baseline")
            ax.set_ylabel("accuracy")
            ax.set_title("Factuality: true vs false statements (95% CI)")
        _percent_axis(ax)
        _version_ticks(ax, versions)
        ax.set_xlim(min(versions) - 0.6, max(versions) + 0.6)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    axes[-1].set_xlabel("policy version evaluated")
    return _save(fig, path)


def _sub(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data
