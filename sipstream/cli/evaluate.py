"""Commands that measure: `eval` (a policy against a baseline), `judge-eval` (the judge on labelled
sets), `experiment` (pretrain / nll / dpo compared end to end) and `report` (plots of a run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sipstream.cli.app import (
    BootstrapOpt,
    ConfigOpt,
    SetOpt,
    app,
    default_logging,
    load,
)
from sipstream.errors import UserError
from sipstream.eval.cli import eval_config_from_sets, load_eval_config
from sipstream.eval.report import markdown_table
from sipstream.eval.run import evaluate
from sipstream.experiment.config import load_experiment
from sipstream.experiment.run import run_experiment
from sipstream.experiment.summary import resummarise
from sipstream.models import Judge
from sipstream.models.judge_eval import run_judge_eval
from sipstream.report import write_report
from sipstream.stages.models import shared_model
from sipstream.telemetry.logs import configure_logging

CRITERIA = ("safety", "quality", "factuality")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="start, a .safetensors file, a run directory or RUN_DIR@VERSION.")],
    baseline: Annotated[str, typer.Option(help="Reference to compare against (same forms), or none.")] = "start",
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", show_default=False,
                     help="YAML config (default: the config.yaml of the run directory --model or --baseline names, "
                          "so 'start' is that run's starting checkpoint; else $SIPSTREAM_CONFIG or configs/tiny.yaml)."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config field, or an eval setting as eval.FIELD=VALUE (repeatable).",
                     show_default=False),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write eval.json, eval.md and eval_samples.jsonl here.",
                                             show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Measure a policy against a baseline on held-out data: win rate, safety, factuality, quality."""

    # --config and --set mean more here than elsewhere: the config defaults to the run's, and --set also
    # takes eval.* settings; so this command resolves its config itself (sipstream.eval.cli).
    eval_cfg, config_sets = eval_config_from_sets(sets or [])
    baseline_ref = None if baseline.lower() == "none" else baseline
    cfg, config_source = load_eval_config(config, config_sets, [model, baseline_ref])
    configure_logging(cfg.logging)
    result = evaluate(cfg, model, baseline_ref, eval_cfg, out, config_source=config_source)
    typer.echo(json.dumps(result, indent=1) if as_json else markdown_table(result))


@app.command("judge-eval")
def judge_eval(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    criteria: Annotated[
        list[str] | None, typer.Option("--criterion", help="safety, quality, factuality (repeatable; default all).",
                                       show_default=False)
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many items per criterion.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here.", show_default=False)] = None,
) -> None:
    """Measure the configured judge on labelled sets built from package-shipped public data."""

    cfg = load(config, sets)
    chosen = tuple(criteria or CRITERIA)
    bad = set(chosen) - set(CRITERIA)
    if bad:
        raise UserError(f"unknown criterion {sorted(bad)}; choose from safety, quality, factuality")
    judge = Judge(shared_model(cfg.models.judge), cfg.judge)
    report = run_judge_eval(judge, chosen, limit=limit, seed=cfg.seed, progress=lambda m: typer.echo(m, err=True))
    figures = report.as_dict()
    typer.echo(f"judge {cfg.models.judge.source} ({cfg.judge.mode} mode), {figures['seconds']:.0f}s:")
    for name in ("safety_auc", "quality_accuracy", "factuality_auc"):
        if figures[name] is not None:
            typer.echo(f"  {name:18s} {figures[name]:.3f}")
    for kind, acc in figures["quality_accuracy_by_spoil"].items():
        typer.echo(f"    quality vs {kind:10s} {acc:.3f}")
    if output is not None:
        output.write_text(json.dumps(figures, indent=2))


@app.command()
def experiment(
    config: Annotated[Path, typer.Argument(help="Experiment YAML, e.g. configs/experiments/cpu.yaml; or a finished "
                                                 "experiment's results.json to rewrite its tables and plots.")],
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override an experiment field, e.g. --set seeds=[1] or --set steps=4.",
                     show_default=False),
    ] = None,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Compare pretrain / nll / dpo from one starting checkpoint on the same stream, evaluate every arm.

    Writes results.json, results.md and plots into a new directory under the experiment's out_dir.
    """

    default_logging()
    if config.suffix == ".json":
        if sets:
            raise UserError("--set changes an experiment to run; a results.json is only re-summarised")
        typer.echo(resummarise(config).read_text())
        return
    exp = load_experiment(config, sets or [])
    command = " ".join(["sipstream experiment", str(config), *(f"--set {s}" for s in sets or [])])
    out = run_experiment(exp, command=command, bootstrap=bootstrap_servers)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results in {out}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `sipstream run`.", show_default=False)],
) -> None:
    """Plot reward, curriculum, learner loss and evals of a run; write RUN_DIR/report/index.html."""

    default_logging()
    typer.echo(f"report: {write_report(run_dir)}")
