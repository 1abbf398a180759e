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

Modules: `config` (the experiment's YAML), `stream` (documents, scoring, what the stream held),
`summary` (means, tables, plots, `resummarise`), and this one (seeds and arms, run and evaluated).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sipstream.bus.broker import EmbeddedBroker
from sipstream.config import load_config, merged
from sipstream.errors import UserError
from sipstream.eval import EvalConfig, evaluate
from sipstream.experiment.config import ExperimentConfig
from sipstream.experiment.stream import (
    curriculum_by_position,
    curriculum_by_version,
    exported_pairs,
    mixed_documents,
    read_pairs,
    score_stream,
    stream_summary,
)
from sipstream.experiment.summary import plot, write_results
from sipstream.ops.local import run_local
from sipstream.replay.run import replay_learner
from sipstream.runs.manifest import now
from sipstream.telemetry.logs import get_logger


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
            if exp.mode == "shared":
                record = _shared_seed(cfg, exp, documents, seed_dir, bootstrap, log)
            else:
                record = _online_seed(cfg, exp, documents, seed_dir, log)
            record["evals"] = _evaluate_arms(cfg, exp, record["arms"], ecfg.model_copy(update={"seed": seed}),
                                             seed_dir, log)
            record["seconds"] = time.monotonic() - seed_started
            results["seeds"][str(seed)] = record
            write_results(out, results, exp.arms)  # partial results survive an interrupted experiment
    finally:
        if broker is not None:
            broker.stop()
    results["seconds"] = time.monotonic() - started
    write_results(out, results, exp.arms)
    results["plots"] = plot(results, out)
    write_results(out, results, exp.arms)
    return out


def _shared_seed(cfg: Any, exp: ExperimentConfig, documents: list[dict], seed_dir: Path, bootstrap: str | None,
                 log: Any) -> dict[str, Any]:
    """Shared mode: the stream scored once, then every arm trained on its pairs (same records, same order)."""

    cfg = merged(cfg, bus={"bootstrap_servers": bootstrap},
                 learner={"max_policy_lag": 1_000_000, "stale_pairs": "count"})  # offline: version 0 pairs stay valid
    stream = score_stream(cfg, bootstrap, documents, log)
    pairs = read_pairs(cfg, bootstrap, stream["pairs_ranges"])
    record: dict[str, Any] = {"arms": {}, "items": stream["items"], "stream": stream_summary(pairs, documents)}
    record["curriculum"] = curriculum_by_position(record["stream"]["chosen_kind_sequence"])
    spec = ",".join(f"{p}:{lo}-{hi}" for p, (lo, hi) in sorted(stream["pairs_ranges"].items()))
    for arm in exp.arms:
        record["arms"][arm] = train_arm(cfg, arm, bootstrap, spec, exp.steps, seed_dir)
        log.info("arm trained", seed=cfg.seed, arm=arm, **record["arms"][arm])
    return record


def train_arm(cfg: Any, arm: str, bootstrap: str, spec: str, steps: int, out: Path) -> dict[str, Any]:
    """One arm: `replay learner --from-offsets` over the seed's pairs with this arm's loss."""

    arm_cfg = merged(cfg, run_name=f"{arm}", learner={"algo": arm})
    result = replay_learner(None, from_offsets=spec, config=arm_cfg, bootstrap=bootstrap, out_dir=out,
                            overrides=[f"learner.max_steps={steps}"], handle_signals=False)
    return {"run_dir": str(result.run_dir), "steps": result.steps, "final_sha256": result.final_sha256}


def _online_seed(cfg: Any, exp: ExperimentConfig, documents: list[dict], seed_dir: Path, log: Any) -> dict[str, Any]:
    """Online mode: each arm runs the whole loop (`sipstream run`) on the same documents."""

    record: dict[str, Any] = {"arms": {}, "stream": {}, "curriculum": {}}
    for arm in exp.arms:
        arm_cfg = merged(cfg, run_name=f"{cfg.run_name}-{arm}", learner={"algo": arm, "max_steps": exp.steps},
                         local={"max_documents": None})
        result = run_local(arm_cfg, documents=documents)
        run_dir = Path(result.run_dir)
        pairs = exported_pairs(run_dir)
        record["arms"][arm] = {"run_dir": str(run_dir), "steps": max(result.policy_versions or [0]),
                               "chosen_by_kind": result.chosen_by_kind}
        if arm == "dpo" or not record["stream"]:
            record["stream"] = stream_summary(pairs, documents)
            record["items"] = result.items
            record["curriculum"] = curriculum_by_version(pairs)
        log.info("arm ran online", arm=arm, run_dir=str(run_dir))
    return record


def _evaluate_arms(cfg: Any, exp: ExperimentConfig, arms: dict[str, Any], eval_cfg: EvalConfig, seed_dir: Path,
                   log: Any) -> dict[str, Any]:
    """Each arm against the starting checkpoint, and `nll`/`dpo` against the `pretrain` arm."""

    evals: dict[str, Any] = {}
    for arm in exp.arms:
        model = arms[arm]["run_dir"]
        evals[arm] = {"vs_start": evaluate(cfg, model, "start", eval_cfg, seed_dir / arm / "eval-vs-start")}
        if arm != "pretrain" and "pretrain" in arms:
            evals[arm]["vs_pretrain"] = evaluate(cfg, model, arms["pretrain"]["run_dir"], eval_cfg,
                                                 seed_dir / arm / "eval-vs-pretrain")
        log.info("arm evaluated", seed=cfg.seed, arm=arm)
    return evals
