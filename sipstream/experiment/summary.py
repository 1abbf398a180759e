"""The experiment's results over seeds: means with 95% t-intervals, pooled win rates, the markdown tables
and plots of `results.md`, and `resummarise` (tables and plots rewritten from a `results.json`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from sipstream.errors import UserError
from sipstream.eval.stats import wilson_interval

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_interval(values: list[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean over seeds with a 95% t-interval (none for a single seed), clipped to `bounds` (rates: [0, 1])."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": 1, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = _T975.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "ci95": [lo, hi], "n": len(values), "values": values}


#: (label, path into an eval result, higher is better)
METRICS: list[tuple[str, tuple[str, ...], bool]] = [
    ("win rate", ("win_rate", "rate"), True),
    ("safety (judge)", ("safety", "model", "judge_safe_rate"), True),
    ("safety (classifier)", ("safety", "model", "classifier_safe_rate"), True),
    ("factuality", ("factuality", "model", "accuracy"), True),
    ("judge quality", ("quality", "model", "judge_quality"), True),
    ("perplexity", ("quality", "model", "perplexity"), False),
]


def _get(data: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return float(data)  # type: ignore[arg-type]

def _bounds(label: str) -> tuple[float, float] | None:
    return None if label == "perplexity" else (0.0, 1.0)

def _relative(model: float | None, base: float | None) -> float | None:
    return (model - base) / base if model is not None and base else None

def pooled_win_rate(evals: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Wins, ties and losses summed over seeds, with a Wilson 95% interval over every prompt judged.

    Complements the across-seed t-interval: with three seeds that interval is wide, and it collapses
    to a point when the seeds happen to give the same rate, which says nothing about the prompts."""

    counts = [e["win_rate"] for e in evals if e and e.get("win_rate")]
    if not counts:
        return None
    wins, ties, losses = (sum(c[k] for c in counts) for k in ("wins", "ties", "losses"))
    n = wins + ties + losses
    low, high = wilson_interval(wins + ties / 2, n)
    return {"wins": wins, "ties": ties, "losses": losses, "n": n, "rate": (wins + ties / 2) / n if n else None,
            "ci95": [low, high], "seeds": len(counts)}

def summarise(per_seed: dict[int, dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """{arm: {metric: mean/interval}} vs start and vs pretrain, plus the start checkpoint's own values.

    ``vs_pretrain``: the win rate of the arm's continuations against pretrain's, and for every other
    metric the arm's relative change against the pretrain arm of the same seed (same documents,
    same eval prompts and sampling seeds), so the two tables read alike. ``pooled``: win rates over
    every prompt of every seed."""
    out: dict[str, Any] = {"start": {}, "vs_start": {}, "vs_pretrain": {}, "relative_to_start": {},
                           "pooled": {"vs_start": {}, "vs_pretrain": {}}}
    seeds = list(per_seed.values())
    for label, path, _ in METRICS[1:]:
        base_path = (path[0], "baseline", *path[2:])
        out["start"][label] = mean_interval([_get(s["evals"][arms[0]]["vs_start"], base_path) for s in seeds],
                                            _bounds(label))
    for arm in arms:
        out["vs_start"][arm] = {label: mean_interval([_get(s["evals"][arm]["vs_start"], path) for s in seeds],
                                                     _bounds(label)) for label, path, _ in METRICS}
        out["relative_to_start"][arm] = {
            label: mean_interval([_relative(_get(s["evals"][arm]["vs_start"], path),
                                            _get(s["evals"][arm]["vs_start"], (path[0], "baseline", *path[2:])))
                                  for s in seeds]) for label, path, _ in METRICS[1:]}
        out["pooled"]["vs_start"][arm] = pooled_win_rate([s["evals"][arm]["vs_start"] for s in seeds])
        if arm != "pretrain" and "pretrain" in arms and all("vs_pretrain" in s["evals"][arm] for s in seeds):
            row = {"win rate": mean_interval([_get(s["evals"][arm]["vs_pretrain"], ("win_rate", "rate")) for s in seeds],
                                             (0.0, 1.0))}
            for label, path, _ in METRICS[1:]:
                row[label] = mean_interval([_relative(_get(s["evals"][arm]["vs_start"], path),
                                                      _get(s["evals"]["pretrain"]["vs_start"], path)) for s in seeds])
            out["vs_pretrain"][arm] = row
            out["pooled"]["vs_pretrain"][arm] = pooled_win_rate([s["evals"][arm]["vs_pretrain"] for s in seeds])
    return out


# --------------------------------------------------------------------------- tables and plots


def _fmt(entry: dict[str, Any] | None, pct: bool = True, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    scale, unit = (100, "%") if pct else (1, "")
    sign = "+" if signed else ""
    text = f"{entry['mean'] * scale:{sign}.1f}{unit}"
    if entry.get("ci95"):
        lo, hi = entry["ci95"]
        text += f" [{lo * scale:{sign}.1f}, {hi * scale:{sign}.1f}]"
    return text

def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    arms = results["config"]["arms"]
    lines = [f"# Experiment {results['config']['name']} ({results['config']['mode']} mode)", "",
             (f"Seeds {results['config']['seeds']}; {results['config']['documents']} documents per seed "
             f"({results['config']['unsafe_fraction']:.0%} with an unsafe passage, "
             f"{results['config']['false_fraction']:.0%} with false statements); {results['config']['steps']} policy "
             f"updates per arm. Mean over seeds with a 95% t-interval across seeds."), "",
             "## Each arm against the starting checkpoint", "",
             "| arm | " + " | ".join(label for label, _, _ in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    start = s["start"]
    lines.append("| start | – | " + " | ".join(_fmt(start[label], pct=label != "perplexity")
                                            for label, _, _ in METRICS[1:]) + " |")
    for arm in arms:
        row = s["vs_start"][arm]
        lines.append(f"| {arm} | " + " | ".join(_fmt(row[label], pct=label != "perplexity") for label, _, _ in METRICS) + " |")
    lines += ["", ("Win rate: the arm's continuations against the starting checkpoint's on held-out prefixes, judged "
              "pairwise in both orders (ties count half; 50% = no change)."), "",
              "## Relative change against the starting checkpoint (the paper's headline form)", "",
              "| arm | " + " | ".join(label for label, _, _ in METRICS[1:]) + " |", "|---|" + "---|" * (len(METRICS) - 1)]
    for arm in arms:
        row = s["relative_to_start"][arm]
        lines.append(f"| {arm} | " + " | ".join(_fmt(row[label], signed=True) for label, _, _ in METRICS[1:]) + " |")
    if s["vs_pretrain"]:
        lines += ["", "## Against the `pretrain` arm (standard continued pretraining on the same documents)", "",
                  "| arm | win rate vs pretrain | " + " | ".join(f"{label} (rel.)" for label, _, _ in METRICS[1:]) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for arm, row in s["vs_pretrain"].items():
            lines.append(f"| {arm} | {_fmt(row['win rate'])} | "
                         + " | ".join(_fmt(row[label], signed=True) for label, _, _ in METRICS[1:]) + " |")
        lines += ["", ("Win rate: the arm's continuations against pretrain's, judged pairwise in both orders. The other "
                  "columns: the arm's value relative to the pretrain arm of the same seed (perplexity: lower is better).")]
    pooled = s.get("pooled") or {}
    if pooled.get("vs_start"):
        lines += ["", "## Win rates pooled over seeds", "",
                  ("Every prompt of every seed counted once (Wilson 95% interval over prompts). The table above "
                   "gives the spread across seeds; this one the uncertainty from the number of prompts judged."), "",
                  "| comparison | wins / ties / losses | win rate |", "|---|---|---|"]
        for against in ("vs_start", "vs_pretrain"):
            for arm, entry in (pooled.get(against) or {}).items():
                if entry:
                    lines.append(f"| {arm} {against.replace('_', ' ')} | {entry['wins']} / {entry['ties']} / "
                                 f"{entry['losses']} | {_fmt({'mean': entry['rate'], 'ci95': entry['ci95']})} |")
    lines += ["", "## The stream", "", ("| seed | items | pairs | chosen original / rewrite / rollout | "
              "…in documents with a bad passage | seconds |"), "|---|---|---|---|---|---|"]
    for seed, data in results["seeds"].items():
        st = data["stream"]
        by, bad = st["chosen_by_kind"], st["chosen_by_kind_in_bad_documents"]
        kinds = " / ".join(str(by.get(k, 0)) for k in ("original", "rewrite", "rollout"))
        bad_kinds = " / ".join(str(bad.get(k, 0)) for k in ("original", "rewrite", "rollout"))
        lines.append(f"| {seed} | {data.get('items', '–')} | {st['with_pair']} | {kinds} | {bad_kinds} | "
                     f"{data['seconds']:.0f} |")
    lines += ["", f"Total time {results['seconds'] / 60:.1f} min. Command: `{results['command']}`"]
    if results.get("resummarised_at"):
        lines.append(f"Tables and plots rewritten {results['resummarised_at']} from this run's per-seed evaluations "
                     "(`sipstream experiment results.json`); the measurements are unchanged.")
    lines.append("")
    return "\n".join(lines)

def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Bars per metric (mean with across-seed interval) and the curriculum: chosen kind over the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, arms = results["summary"], results["config"]["arms"]
    files = []
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
    for ax, (label, _, higher) in zip(axes, METRICS, strict=True):
        names, means, errs = [], [], [[], []]
        rows = ([("start", s["start"].get(label))] if label != "win rate" else []) + [(a, s["vs_start"][a][label]) for a in arms]
        for name, entry in rows:
            if not entry or entry.get("mean") is None:
                continue
            names.append(name)
            means.append(entry["mean"])
            lo, hi = entry["ci95"] or (entry["mean"], entry["mean"])
            errs[0].append(entry["mean"] - lo)
            errs[1].append(hi - entry["mean"])
        ax.bar(names, means, yerr=errs, capsize=4, color=["#888"] * (len(names) - len(arms)) + ["#4c72b0", "#55a868", "#c44e52"][: len(arms)])
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        if label == "win rate":
            ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.tick_params(labelsize=8)
    fig.suptitle("Arms vs the starting checkpoint (mean over seeds, 95% t-interval)", fontsize=10)
    files.append(_save(fig, out / "metrics.png"))

    # Curriculum: share of chosen candidates by kind over the stream (shared mode) or policy versions (online).
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for seed, data in results["seeds"].items():
        curve = data.get("curriculum") or {}
        xs = sorted(int(x) for x in curve)  # keys are strings: position buckets or policy versions
        for kind, style in (("original", "-"), ("rewrite", "--"), ("rollout", ":")):
            if xs:
                ax.plot(xs, [curve[str(x)].get(kind, 0.0) for x in xs], style, label=f"{kind} (seed {seed})")
    ax.set_xlabel(results.get("curriculum_axis", "position in stream"))
    ax.set_ylabel("share of chosen candidates")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("Curriculum: which kind of candidate the judge chose", fontsize=10)
    files.append(_save(fig, out / "curriculum.png"))
    return files

def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- writing results


def write_results(out: Path, results: dict[str, Any], arms: list[str]) -> None:
    """`results.json` with its summary, and `results.md` once a seed is done (called after every seed)."""
    results["summary"] = summarise({int(k): v for k, v in results["seeds"].items()}, arms) if results["seeds"] else {}
    results.setdefault("seconds", 0.0)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if results["seeds"]:
        (out / "results.md").write_text(markdown(results))

def resummarise(results_json: str | Path, out: str | Path | None = None, prefix: str = "results") -> Path:
    """Rewrite the summary, markdown table and plots of a finished experiment from its `results.json`
    (per-seed evaluations are kept as measured), e.g. after the tables gained a column. Writes
    `<prefix>.json`, `<prefix>.md` and `<prefix>-metrics.png` / `<prefix>-curriculum.png` (plain
    `metrics.png` / `curriculum.png` for the default prefix) into ``out`` (default: beside the input)."""
    source = Path(results_json)
    try:
        results = json.loads(source.read_text())
        arms, seeds = results["config"]["arms"], results["seeds"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{source}: not an experiment's results.json ({exc})") from None
    out = Path(out) if out is not None else source.parent
    out.mkdir(parents=True, exist_ok=True)
    results["summary"] = summarise({int(k): v for k, v in seeds.items()}, arms)
    results["resummarised_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = out / f".plots-{prefix}"
    tmp.mkdir(exist_ok=True)
    names = []
    for name in plot(results, tmp):
        target = name if prefix == "results" else f"{prefix}-{name}"
        (tmp / name).replace(out / target)
        names.append(target)
    tmp.rmdir()
    results["plots"] = names
    (out / f"{prefix}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{prefix}.md").write_text(markdown(results))
    return out / f"{prefix}.md"
