"""`sipstream experiment`: the paper's continued-pretraining comparison, end to end, at any scale.

One stream of documents per seed — public-domain text with a known share of documents carrying an
unsafe or a false passage from the *training* split of the shipped probes (held-out probes are kept
for `sipstream eval`) — so that standard pretraining has something bad to imitate. Every arm
(`pretrain`, `nll`, `dpo`) starts from the same checkpoint, sees the same documents, seeds and judge,
and makes the same number of policy updates; then each arm is evaluated against the starting
checkpoint (as the paper reports) and the `nll`/`dpo` arms against the `pretrain` arm.

Two modes:

- ``shared`` (the CPU default): the stream is processed once per seed — split, rewrite, rollouts *of
  the starting checkpoint*, judge, assemble — and every arm trains on the identical `sip.pairs`
  range through `replay learner --from-offsets` (same records, same order). Arms differ only by their
  loss. This is the offline limit of the paper's method (rollouts never see updated weights, i.e.
  `sync_every` = ∞), the one a 2-core machine can afford three times over.
- ``online``: every arm runs the whole loop (`sipstream run`) with its own algorithm, so rollouts
  come from the arm's current policy and the curriculum (share of chosen candidates by kind over
  policy versions) can move, as in the paper. Meant for GPUs.

Results: `results.json`, `results.md` and plots in the experiment directory; arms are summarised
over seeds by their mean and a 95% t-interval (per-seed evaluation intervals are kept in the JSON).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker
from sipstream.bus.runner import StageRunner
from sipstream.config import load_config, merged
from sipstream.errors import UserError
from sipstream.eval import EvalConfig, evaluate
from sipstream.eval.heldout import training_corpus, training_probes
from sipstream.eval.stats import wilson_interval
from sipstream.ops.ingest import produce_documents
from sipstream.ops.local import run_local
from sipstream.bus.fetch import RecordFetcher
from sipstream.replay.run import replay_learner
from sipstream.runs.manifest import now, read_ends
from sipstream.stages import build_stage
from sipstream.telemetry.logs import get_logger

ARMS = ("pretrain", "nll", "dpo")
#: Toxicity categories whose prompts read as unsafe text to imitate (flirtation and the like are mild).
UNSAFE_CATEGORIES = ("insult", "profanity", "severe_toxicity", "threat", "identity_attack")


class ExperimentConfig(BaseModel):
    """One comparison: which config, which arms, how many documents, updates and seeds."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Name of the experiment; its directory is `out_dir/<name>-<timestamp>`."""

    base_config: Path
    """The sipstream config every arm runs with (models, items, judge, learner defaults)."""

    set: list[str] = Field(default_factory=list)
    """Overrides of the base config, as `--set` takes them (e.g. `items.suffix_tokens=32`)."""

    mode: Literal["shared", "online"] = "shared"
    """``shared``: one scored stream per seed, every arm trains on its pairs (CPU). ``online``:
    every arm runs the full loop with its own rollouts (GPU)."""

    arms: list[Literal["pretrain", "nll", "dpo"]] = Field(default_factory=lambda: list(ARMS))
    """Algorithms compared; `pretrain` is the standard next-token baseline."""

    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """One repetition per seed: the documents drawn, item seeds, sampling and learner RNG."""

    documents: int = Field(16, ge=1)
    """Training documents per seed, drawn from the training split of the shipped corpus."""

    unsafe_fraction: float = Field(0.25, ge=0, le=1)
    """Share of documents carrying an unsafe passage (training-split RealToxicityPrompts texts)."""

    false_fraction: float = Field(0.25, ge=0, le=1)
    """Share of documents carrying false statements (training-split false claims)."""

    insert_after_words: int = Field(60, ge=1)
    """The bad passage is put at the first sentence end after this many words, where the first items'
    suffixes are (see `items.min_prefix_tokens`)."""

    steps: int = Field(8, ge=1)
    """Policy updates per arm (the same for every arm)."""

    evaluation: dict[str, Any] = Field(default_factory=dict)
    """Fields of `sipstream.eval.EvalConfig` (sizes of the held-out sets, tokens per continuation)."""

    out_dir: Path = Path("runs/experiments")
    """Parent folder of the experiment directory."""

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.unsafe_fraction + self.false_fraction > 1:
            raise ValueError("unsafe_fraction + false_fraction must be at most 1")
        if len(set(self.arms)) != len(self.arms) or not self.arms:
            raise ValueError("arms must be distinct and not empty")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError("seeds must be distinct and not empty")
        return self


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment config {path} not found (see configs/experiments/)")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: write FIELD=VALUE, e.g. --set steps=4")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    try:
        exp = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not exp.base_config.is_absolute() and not exp.base_config.is_file():
        candidate = path.parent / exp.base_config
        exp.base_config = candidate if candidate.is_file() else exp.base_config
    return exp


# --------------------------------------------------------------------------- the shared stream of documents


def _insert(text: str, passage: str, after_words: int) -> str:
    """`passage` as a paragraph of its own at the first sentence end after `after_words` words."""
    words = 0
    for index, char in enumerate(text):
        if char.isspace() and index and not text[index - 1].isspace():
            words += 1
        if words >= after_words and char in ".!?" and index + 1 < len(text) and text[index + 1].isspace():
            return f"{text[: index + 1]}\n\n{passage}\n\n{text[index + 1:].lstrip()}"
    return f"{text}\n\n{passage}"


def mixed_documents(exp: ExperimentConfig, seed: int) -> list[dict]:
    """The seed's documents: training-split corpus excerpts, a known share of them with a bad passage.

    Each document's `meta.injected` says what was put in ("unsafe", "false" or None) and from which
    probe ids, so the stream's composition can be counted downstream."""

    rng = random.Random(seed)
    corpus = training_corpus()
    if exp.documents > len(corpus):
        raise UserError(f"documents={exp.documents} but the training corpus has {len(corpus)}")
    chosen = rng.sample(corpus, exp.documents)
    unsafe = [p for p in training_probes("toxicity_prompts") if p["category"] in UNSAFE_CATEGORIES]
    false = training_probes("false_claims")
    rng.shuffle(unsafe)
    rng.shuffle(false)
    n_unsafe = round(exp.unsafe_fraction * exp.documents)
    n_false = round(exp.false_fraction * exp.documents)
    kinds = ["unsafe"] * n_unsafe + ["false"] * n_false + [None] * (exp.documents - n_unsafe - n_false)
    rng.shuffle(kinds)
    out = []
    for doc, kind in zip(chosen, kinds):
        doc = json.loads(json.dumps(doc))
        picked: list[dict] = []
        if kind == "unsafe":
            picked = [unsafe.pop() for _ in range(2)]
        elif kind == "false":
            picked = [false.pop() for _ in range(3)]
        if picked:
            doc["text"] = _insert(doc["text"], " ".join(p["text"] for p in picked), exp.insert_after_words)
        doc["doc_id"] = f"{doc['doc_id']}-s{seed}"
        doc.setdefault("meta", {})["injected"] = kind
        doc["meta"]["injected_from"] = [p["probe_id"] for p in picked]
        out.append(doc)
    return out


# --------------------------------------------------------------------------- running one seed


def _stage(name: str, cfg: Any, bootstrap: str, expect: int) -> dict[str, float]:

    stats = StageRunner(build_stage(name, cfg), cfg, bootstrap).run(until=lambda s: s.counters["consumed"] >= expect)
    return dict(stats.counters)


def score_stream(cfg: Any, bootstrap: str, documents: list[dict], log: Any) -> dict[str, Any]:
    """split → rewrite → rollout → judge → assemble, each stage run until it consumed its input."""

    T.create_topics(cfg.bus, bootstrap, T.load_specs(T.topics_dir(cfg.bus)))
    produce_documents(cfg.bus, bootstrap, documents)
    counters = {"split": _stage("split", cfg, bootstrap, len(documents))}
    items = int(counters["split"].get("produced", 0))
    for name in ("rewrite", "rollout", "judge", "assemble"):
        started = time.monotonic()
        counters[name] = _stage(name, cfg, bootstrap, items)
        log.info("stage done", stage=name, items=items, seconds=round(time.monotonic() - started, 1))
    ends = read_ends(bootstrap, cfg.bus, [T.PAIRS])[T.PAIRS]
    return {"items": items, "counters": counters, "pairs_ranges": {int(p): [int(lo), int(hi)] for p, (lo, hi) in ends.items()}}


def read_pairs(cfg: Any, bootstrap: str, ranges: dict[int, list[int]]) -> list[dict]:

    fetcher = RecordFetcher(cfg.bus, bootstrap, cfg.bus.topic(T.PAIRS))
    try:
        return [json.loads(m.value()) for p, (lo, hi) in sorted(ranges.items()) for m in fetcher.read_range(p, lo, hi)]
    finally:
        fetcher.close()


def stream_summary(pairs: list[dict], documents: list[dict]) -> dict[str, Any]:
    """What the stream held: chosen candidates by kind (all, and for items of bad documents)."""
    injected = {d["doc_id"]: d["meta"]["injected"] for d in documents}
    chosen: Counter[str] = Counter()
    chosen_bad: Counter[str] = Counter()
    order: list[str | None] = []
    for pair in pairs:
        kind = (pair.get("chosen") or {}).get("kind")
        order.append(kind)
        if kind:
            chosen[kind] += 1
            if injected.get(pair["doc_id"]):
                chosen_bad[kind] += 1
    return {"pairs": len(pairs), "with_pair": sum(1 for k in order if k), "chosen_by_kind": dict(chosen),
            "chosen_by_kind_in_bad_documents": dict(chosen_bad), "chosen_kind_sequence": order,
            "documents_by_injection": dict(Counter(str(d["meta"]["injected"]) for d in documents))}


def train_arm(cfg: Any, arm: str, bootstrap: str, spec: str, steps: int, out: Path) -> dict[str, Any]:
    """One arm: `replay learner --from-offsets` over the seed's pairs with this arm's loss."""

    arm_cfg = merged(cfg, run_name=f"{arm}", learner={"algo": arm})
    result = replay_learner(None, from_offsets=spec, config=arm_cfg, bootstrap=bootstrap, out_dir=out,
                            overrides=[f"learner.max_steps={steps}"], handle_signals=False)
    return {"run_dir": str(result.run_dir), "steps": result.steps, "final_sha256": result.final_sha256}


# --------------------------------------------------------------------------- summarising over seeds

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
    for ax, (label, _, higher) in zip(axes, METRICS):
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


def curriculum_by_position(kinds: list[str | None], buckets: int = 4) -> dict[str, dict[str, float]]:
    """Share of chosen kinds in consecutive quarters of the stream (shared mode: rollouts never change)."""
    kinds = [k for k in kinds if k]
    if not kinds:
        return {}
    size = max(1, math.ceil(len(kinds) / buckets))
    out = {}
    for b, start in enumerate(range(0, len(kinds), size)):
        part = Counter(kinds[start : start + size])
        total = sum(part.values())
        out[str(b + 1)] = {k: part.get(k, 0) / total for k in ("original", "rewrite", "rollout")}
    return out


# --------------------------------------------------------------------------- the whole experiment


def run_experiment(exp: ExperimentConfig, *, command: str = "", bootstrap: str | None = None) -> Path:
    """Run every seed and arm, evaluate, and write results.{json,md} and plots; returns the directory."""

    log = get_logger(component="experiment", experiment=exp.name)
    try:
        ecfg = EvalConfig(**exp.evaluation)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"evaluation.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    base = load_config(exp.base_config, exp.set)
    out = exp.out_dir / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(json.loads(exp.model_dump_json()), sort_keys=False))
    started = time.monotonic()
    results: dict[str, Any] = {"config": json.loads(exp.model_dump_json()), "created_at": now(), "command": command,
                               "seeds": {}, "curriculum_axis": "quarter of the stream" if exp.mode == "shared"
                               else "policy version"}

    broker = None
    if exp.mode == "shared" and bootstrap is None and base.bus.bootstrap_servers is None:

        broker = EmbeddedBroker(base.bus.embedded)
        broker.start()
        bootstrap = broker.bootstrap_servers
    try:
        for seed in exp.seeds:
            seed_started = time.monotonic()
            seed_dir = out / f"seed{seed}"
            documents = mixed_documents(exp, seed)
            cfg = merged(base, seed=seed, run_name=f"{exp.name}-s{seed}", run_dir=str(seed_dir),
                         bus={"topic_prefix": f"exp-{out.name}-s{seed}.", "group_prefix": f"exp-{out.name}-s{seed}."})
            record: dict[str, Any] = {"arms": {}, "evals": {}}
            if exp.mode == "shared":
                cfg = merged(cfg, bus={"bootstrap_servers": bootstrap},
                             learner={"max_policy_lag": 1_000_000, "stale_pairs": "count"})  # offline: version 0 pairs stay valid
                stream = score_stream(cfg, bootstrap, documents, log)
                pairs = read_pairs(cfg, bootstrap, stream["pairs_ranges"])
                record["items"] = stream["items"]
                record["stream"] = stream_summary(pairs, documents)
                record["curriculum"] = curriculum_by_position(record["stream"]["chosen_kind_sequence"])
                spec = ",".join(f"{p}:{lo}-{hi}" for p, (lo, hi) in sorted(stream["pairs_ranges"].items()))
                for arm in exp.arms:
                    record["arms"][arm] = train_arm(cfg, arm, bootstrap, spec, exp.steps, seed_dir)
                    log.info("arm trained", seed=seed, arm=arm, **record["arms"][arm])
            else:
                record.update(_online_seed(cfg, exp, documents, seed_dir, log))
            eval_cfg = ecfg.model_copy(update={"seed": seed})
            for arm in exp.arms:
                model = record["arms"][arm]["run_dir"]
                record["evals"][arm] = {"vs_start": evaluate(cfg, model, "start", eval_cfg, seed_dir / arm / "eval-vs-start")}
                if arm != "pretrain" and "pretrain" in record["arms"]:
                    record["evals"][arm]["vs_pretrain"] = evaluate(cfg, model, record["arms"]["pretrain"]["run_dir"],
                                                                   eval_cfg, seed_dir / arm / "eval-vs-pretrain")
                log.info("arm evaluated", seed=seed, arm=arm)
            record["seconds"] = time.monotonic() - seed_started
            results["seeds"][str(seed)] = record
            _write(out, results, exp)  # partial results survive an interrupted experiment
    finally:
        if broker is not None:
            broker.stop()
    results["seconds"] = time.monotonic() - started
    _write(out, results, exp)
    results["plots"] = plot(results, out)
    _write(out, results, exp)
    return out


def _write(out: Path, results: dict[str, Any], exp: ExperimentConfig) -> None:
    results["summary"] = summarise({int(k): v for k, v in results["seeds"].items()}, exp.arms) if results["seeds"] else {}
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


def _online_seed(cfg: Any, exp: ExperimentConfig, documents: list[dict], seed_dir: Path, log: Any) -> dict[str, Any]:
    """Online mode: each arm runs the whole loop (`sipstream run`) on the same documents."""

    record: dict[str, Any] = {"arms": {}, "stream": {}, "curriculum": {}}
    for arm in exp.arms:
        arm_cfg = merged(cfg, run_name=f"{cfg.run_name}-{arm}", learner={"algo": arm, "max_steps": exp.steps},
                         local={"max_documents": None})
        result = run_local(arm_cfg, documents=documents)
        run_dir = Path(result.run_dir)
        pairs = _exported_pairs(run_dir)
        record["arms"][arm] = {"run_dir": str(run_dir), "steps": max(result.policy_versions or [0]),
                               "chosen_by_kind": result.chosen_by_kind}
        if arm == "dpo" or not record["stream"]:
            record["stream"] = stream_summary(pairs, documents)
            record["items"] = result.items
            record["curriculum"] = _curriculum_by_version(pairs)
        log.info("arm ran online", arm=arm, run_dir=str(run_dir))
    return record


def _exported_pairs(run_dir: Path) -> list[dict]:
    pairs = []
    for path in sorted((run_dir / "export" / "sip.pairs").glob("*.jsonl")):
        pairs += [json.loads(json.loads(line)["value"]) for line in path.read_text().splitlines() if line.strip()]
    return pairs


def _curriculum_by_version(pairs: list[dict]) -> dict[str, dict[str, float]]:
    by_version: dict[int, Counter[str]] = {}
    for pair in pairs:
        kind = (pair.get("chosen") or {}).get("kind")
        if kind:
            by_version.setdefault(int(pair.get("policy_version", 0)), Counter())[kind] += 1
    return {str(v): {k: c.get(k, 0) / sum(c.values()) for k in ("original", "rewrite", "rollout")}
            for v, c in sorted(by_version.items())}
