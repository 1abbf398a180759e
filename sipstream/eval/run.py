"""`evaluate()`: one model against a baseline on the held-out sets, as JSON and a markdown table.

Phases, in order: resolve both references → build the held-out sets → sample continuations (model,
then baseline) → win rate (judge, both orders) → per-model blocks: quality against the original
suffix, safety (judge + classifier), factuality (likelihood), perplexity → write the files.

An experiment evaluates many arms against one baseline, so three things are cached per process:
loaded policies (:mod:`sipstream.eval.policy`), generated continuations (key: the policy's spec and
weights sha256, prompts, seeds, max_new_tokens and sampling settings) and each model's metric block
(the same key plus the eval settings and the judge), together with the judge itself. A cache hit
costs nothing, which the ``cost`` section of the result shows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipstream.eval.config import EvalConfig
from sipstream.eval.metrics import (
    classify,
    factuality,
    held_out_perplexity,
    pairwise_scores,
    profanity_probabilities,
    safety_block,
    tally,
)
from sipstream.eval.policy import (
    LoadedPolicy,
    WeightsRef,
    clear_cache,
    load_resolved,
    policy_identity,
    resolve_weights,
)
from sipstream.eval.report import markdown_table
from sipstream.eval.sets import (
    FactPair,
    Prompt,
    fact_pairs,
    perplexity_texts,
    safety_prompts,
    winrate_prompts,
)
from sipstream.eval.stats import mean
from sipstream.models import Judge, load_text_model
from sipstream.models.base import TextModel, derive_seed
from sipstream.models.prompts import last_words
from sipstream.telemetry.logs import get_logger


def _log():
    """The eval's logger, bound when used: a logger bound at import would keep structlog's default
    configuration (stdout) instead of the CLI's (stderr), and corrupt `--json` output."""
    return get_logger(stage="eval")

_CONTINUATIONS: dict[str, list[str]] = {}
_BLOCKS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
_JUDGES: dict[str, Any] = {}


@dataclass
class Cost:
    """What this call spent (cache hits cost nothing)."""

    generation_s: float = 0.0
    judge_calls: int = 0  # prompts sent to the judge (a pairwise comparison is 2: both orders)
    judge_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"generation_s": round(self.generation_s, 3), "judge_calls": self.judge_calls,
                "judge_s": round(self.judge_s, 3)}


@dataclass
class EvalSets:
    """The held-out prompts and texts of one EvalConfig."""

    winrate: list[Prompt]
    safety: list[Prompt]
    facts: list[FactPair]
    perplexity: list[tuple[str, str]]

    @classmethod
    def build(cls, ecfg: EvalConfig) -> EvalSets:
        suffix_words = max(1, round(0.7 * ecfg.max_new_tokens))
        return cls(winrate_prompts(ecfg.winrate_prompts, ecfg.prefix_words, suffix_words),
                   safety_prompts(ecfg.safety_prompts), fact_pairs(ecfg.factuality_pairs),
                   perplexity_texts(ecfg.perplexity_docs))


@dataclass
class Arm:
    """One side of the comparison: resolved weights, loaded only when something is not cached."""

    cfg: Any
    ref: str
    weights: WeightsRef
    identity: str = field(init=False)

    def __post_init__(self) -> None:
        self.identity = policy_identity(self.cfg, self.weights)

    def model(self) -> TextModel:
        loaded: LoadedPolicy = load_resolved(self.cfg, self.weights)
        return loaded.model


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _seeds(root: int, kind: str, prompts: Sequence[Prompt]) -> list[int]:
    """Per-prompt sampling seeds: a function of the root seed and the prompt's id only."""
    return [derive_seed(root, kind, prompt.prompt_id) for prompt in prompts]


def _shown(prompts: Sequence[Prompt], ecfg: EvalConfig) -> list[str]:
    """The end of each prefix, as the judge sees it."""
    return [last_words(p.prefix, ecfg.judge_prefix_words) for p in prompts]


def continuations(arm: Arm, prompts: Sequence[Prompt], seeds: Sequence[int], ecfg: EvalConfig, cost: Cost) -> list[str]:
    """The arm's sampled continuation of each prompt (cached)."""
    key = _key("continuations", arm.identity, [p.prefix for p in prompts], list(seeds), ecfg.max_new_tokens,
               ecfg.temperature, ecfg.top_p)
    if key not in _CONTINUATIONS:
        model = arm.model()
        started = time.perf_counter()
        _CONTINUATIONS[key] = model.generate([p.prefix for p in prompts], ecfg.max_new_tokens, list(seeds),
                                             temperature=ecfg.temperature, top_p=ecfg.top_p)
        cost.generation_s += time.perf_counter() - started
        _log().info("continuations sampled", ref=arm.ref, prompts=len(prompts), seconds=round(time.perf_counter() - started, 1))
    return _CONTINUATIONS[key]


def _judge_key(cfg: Any) -> str:
    return _key(cfg.models.judge.model_dump(mode="json"), cfg.judge.model_dump(mode="json"))


def get_judge(cfg: Any) -> Any:
    """The judge of ``cfg`` (loaded once per process; never the policy instance, so no weights reach it)."""

    key = _judge_key(cfg)
    if key not in _JUDGES:
        _JUDGES[key] = Judge(load_text_model(cfg.models.judge), cfg.judge)
        _log().info("judge loaded", source=str(cfg.models.judge.source), mode=cfg.judge.mode)
    return _JUDGES[key]


class _Timed:
    """Adds the wall time of a block to ``cost.judge_s``."""

    def __init__(self, cost: Cost) -> None:
        self.cost = cost

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.cost.judge_s += time.perf_counter() - self.started


def model_block(arm: Arm, seed: int, sets: EvalSets, ecfg: EvalConfig, judge: Any, cost: Cost) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Safety, factuality and quality of one model, sampling with root ``seed`` (cached), and its rows."""
    settings = ecfg.model_dump(mode="json", exclude={"seed", "baseline_seed"})
    key = _key("block", arm.identity, seed, settings, _judge_key(arm.cfg))
    if key in _BLOCKS:
        return _BLOCKS[key]
    rows: list[dict[str, Any]] = []

    # --- quality: the model's continuation against the original suffix, in both orders ---
    prompts = sets.winrate
    texts = continuations(arm, prompts, _seeds(seed, "winrate", prompts), ecfg, cost)
    with _Timed(cost):
        quality, calls = pairwise_scores(judge, _shown(prompts, ecfg), texts, [p.reference for p in prompts],
                                         _seeds(seed, "judge", prompts))
    cost.judge_calls += calls
    rows += [{"metric": "quality", "prompt_id": p.prompt_id, "continuation": t, "reference": p.reference, "score": q}
             for p, t, q in zip(prompts, texts, quality, strict=True)]

    # --- safety: continuations of unsafe-leaning prefixes, judge and classifier ---
    prompts = sets.safety
    texts = continuations(arm, prompts, _seeds(seed, "safety", prompts), ecfg, cost)
    shown = _shown(prompts, ecfg) if ecfg.safety_show_prefix else [""] * len(prompts)
    with _Timed(cost):
        p_safe = judge.safety_scores(shown, texts, _seeds(seed, "judge", prompts))
    cost.judge_calls += len(texts) * (judge.spec.safety_samples if judge.spec.mode == "generate" else 1)
    p_offensive = profanity_probabilities(texts)
    safety = safety_block(p_safe, p_offensive, ecfg.safety_threshold, ecfg.classifier_threshold)
    rows += [{"metric": "safety", "prompt_id": p.prompt_id, "prefix": p.prefix, "continuation": t,
              "judge_p_safe": s, "classifier_p_offensive": o} for p, t, s, o in zip(prompts, texts, p_safe, p_offensive, strict=True)]

    # --- factuality and perplexity: likelihoods, no sampling ---
    model = arm.model()
    facts, margins = factuality(model, sets.facts)
    rows += [{"metric": "factuality", "probe_id": f.probe_id, "true": f.true, "false": f.false, "margin": m}
             for f, m in zip(sets.facts, margins, strict=True)]
    max_tokens = min(ecfg.perplexity_max_tokens, max(8, arm.cfg.models.policy.max_prompt_tokens - 16))
    ppl, tokens = held_out_perplexity(model, [text for _, text in sets.perplexity], max_tokens)

    block = {"safety": safety, "factuality": facts,
             "quality": {"judge_quality": mean(quality), "perplexity": ppl, "tokens": tokens}}
    _BLOCKS[key] = (block, rows)
    _log().info("model measured", ref=arm.ref, judge_safe=safety["judge_safe_rate"], factuality=facts["accuracy"],
             perplexity=round(ppl, 3))
    return _BLOCKS[key]


def win_rate(model: Arm, baseline: Arm, sets: EvalSets, ecfg: EvalConfig, judge: Any, cost: Cost) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Model vs baseline continuations of the same prefixes; the judge asked in both orders."""
    prompts = sets.winrate
    ours = continuations(model, prompts, _seeds(ecfg.seed, "winrate", prompts), ecfg, cost)
    baseline_seed = ecfg.seed if ecfg.baseline_seed is None else ecfg.baseline_seed
    theirs = continuations(baseline, prompts, _seeds(baseline_seed, "winrate", prompts), ecfg, cost)
    with _Timed(cost):
        scores, calls = pairwise_scores(judge, _shown(prompts, ecfg), ours, theirs,
                                        _seeds(ecfg.seed, "judge", prompts))
    cost.judge_calls += calls
    outcomes = classify(scores, ecfg.tie_margin)
    _log().info("win rate judged", model=model.ref, baseline=baseline.ref, judge_prompts=calls,
                wins=outcomes.count("win"), ties=outcomes.count("tie"), losses=outcomes.count("loss"))
    rows = [{"metric": "win_rate", "prompt_id": p.prompt_id, "prefix": p.prefix, "model": a, "baseline": b,
             "score": s, "outcome": o} for p, a, b, s, o in zip(prompts, ours, theirs, scores, outcomes, strict=True)]
    return tally(outcomes).as_dict(), rows


def evaluate(cfg: Any, model: str, baseline: str | None = "start", eval_cfg: EvalConfig | None = None,
             out_dir: Path | None = None, config_source: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` against ``baseline`` (both references as :func:`load_policy` accepts;
    ``baseline=None`` measures the model alone) with the judge and policy spec of ``cfg``
    (``config_source``, where ``cfg`` came from, is only logged).

    Returns the result dict (see ``sipstream/eval/__init__.py`` for its fields); with ``out_dir``
    also writes ``eval.json``, ``eval.md`` and ``eval_samples.jsonl`` (every prompt's texts and scores)."""
    ecfg = eval_cfg or EvalConfig()
    cost = Cost()
    started = time.perf_counter()
    arm = Arm(cfg, model, resolve_weights(model))
    base = Arm(cfg, baseline, resolve_weights(baseline)) if baseline is not None else None
    sets = EvalSets.build(ecfg)
    judge = get_judge(cfg)
    _log().info("eval started", model=model, baseline=baseline, config=config_source,
                policy=str(cfg.models.policy.source), winrate_prompts=len(sets.winrate),
                safety_prompts=len(sets.safety), factuality_pairs=len(sets.facts))

    rows: list[dict[str, Any]] = []
    wins = None
    if base is not None:
        wins, win_rows = win_rate(arm, base, sets, ecfg, judge, cost)
        rows += win_rows
    model_metrics, model_rows = model_block(arm, ecfg.seed, sets, ecfg, judge, cost)
    rows += [{"role": "model", **row} for row in model_rows]
    base_metrics = None
    if base is not None:
        baseline_seed = ecfg.seed if ecfg.baseline_seed is None else ecfg.baseline_seed
        base_metrics, base_rows = model_block(base, baseline_seed, sets, ecfg, judge, cost)
        rows += [{"role": "baseline", **row} for row in base_rows]

    result = {
        "model": model, "baseline": baseline,
        "model_sha256": arm.weights.sha256, "baseline_sha256": base.weights.sha256 if base else None,
        "model_resolved": arm.weights.path_or_uri, "baseline_resolved": base.weights.path_or_uri if base else None,
        "policy_source": str(cfg.models.policy.source), "judge_source": str(cfg.models.judge.source),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "eval_config": ecfg.model_dump(mode="json"),
        "win_rate": wins,
        **{axis: {"model": model_metrics[axis], "baseline": base_metrics[axis] if base_metrics else None}
           for axis in ("safety", "factuality", "quality")},
        "cost": cost.as_dict() | {"total_s": round(time.perf_counter() - started, 3)},
    }
    if out_dir is not None:
        write_outputs(Path(out_dir), result, rows)
    _log().info("eval finished", model=model, baseline=baseline, seconds=result["cost"]["total_s"],
             win_rate=wins["rate"] if wins else None)
    return result


def write_outputs(out_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """eval.json (the result), eval.md (the table) and eval_samples.jsonl (per-prompt texts and scores)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out_dir / "eval.md").write_text(markdown_table(result) + "\n", encoding="utf-8")
    with open(out_dir / "eval_samples.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def clear_caches() -> None:
    """Forget cached continuations, metric blocks, judges and policies."""

    _CONTINUATIONS.clear()
    _BLOCKS.clear()
    _JUDGES.clear()
    clear_cache()
