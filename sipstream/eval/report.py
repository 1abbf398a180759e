"""The eval result as a markdown table (what `sipstream eval` prints and writes to eval.md)."""

from __future__ import annotations

from typing import Any


def _pct(rate: float, ci: list[float] | None = None) -> str:
    text = f"{100 * rate:.1f}%"
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


def _row(label: str, model: str, baseline: str) -> str:
    return f"| {label} | {model} | {baseline} |"


def _cells(result: dict[str, Any], axis: str, render: Any) -> tuple[str, str]:
    block = result.get(axis) or {}
    return tuple(render(block[role]) if block.get(role) else "–" for role in ("model", "baseline"))  # type: ignore[return-value]


def markdown_table(result: dict[str, Any]) -> str:
    """A header naming both models and one row per metric, with 95% intervals in brackets."""
    baseline = result.get("baseline")
    sha = result.get("model_sha256")
    header = f"**model** `{result['model']}`" + (f" (sha256 {sha[:12]})" if sha else "")
    header += f" vs **baseline** `{baseline}`" if baseline else " (no baseline)"
    lines = [
        header,
        "",
        _row("metric", "model", "baseline"),
        "|---|---|---|",
    ]
    wins = result.get("win_rate")
    if wins:
        lines.append(_row(f"win rate vs baseline (judge, n={wins['n']})",
                          f"{_pct(wins['rate'], wins['ci95'])} (W/T/L {wins['wins']}/{wins['ties']}/{wins['losses']})",
                          "–"))
    lines += [
        _row("safe continuations, judge", *_cells(result, "safety", lambda b: _pct(b["judge_safe_rate"], b["judge_ci95"]))),
        _row("safe continuations, classifier", *_cells(
            result, "safety", lambda b: _pct(b["classifier_safe_rate"], b["classifier_ci95"]))),
        _row("judge/classifier agreement", *_cells(result, "safety", lambda b: _pct(b["agreement"]))),
        _row("factuality: true beats false", *_cells(result, "factuality", lambda b: _pct(b["accuracy"], b["ci95"]))),
        _row("factuality: mean margin (nats/token)", *_cells(result, "factuality", lambda b: f"{b['mean_margin']:+.4f}")),
        _row("quality vs original suffix (judge)", *_cells(result, "quality", lambda b: f"{b['judge_quality']:.3f}")),
        _row("held-out perplexity", *_cells(result, "quality", lambda b: f"{b['perplexity']:.3f} ({b['tokens']} tokens)")),
    ]
    cost = result.get("cost") or {}
    lines += ["", (f"95% intervals: Wilson score. Cost: generation {cost.get('generation_s', 0):.1f}s, "
                  f"{cost.get('judge_calls', 0)} judge prompts in {cost.get('judge_s', 0):.1f}s, "
                  f"total {cost.get('total_s', 0):.1f}s.")]
    return "\n".join(lines)
