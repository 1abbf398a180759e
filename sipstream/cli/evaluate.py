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
from sipstream.eval.judge import (
    evaluate_judge,
    format_figures,
    heldout_factuality,
    heldout_safety,
    read_factuality_file,
    read_safety_file,
)
from sipstream.eval.judge_builtin import run_judge_eval
from sipstream.eval.judge_train import DEFAULT_ALPHA, DEFAULT_L2, DEFAULT_LAYER, train_judge_heads
from sipstream.eval.report import markdown_table
from sipstream.eval.run import evaluate
from sipstream.experiment.config import load_experiment
from sipstream.experiment.run import run_experiment
from sipstream.experiment.summary import resummarise
from sipstream.models import Judge
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
    safety_file: Annotated[Path | None, typer.Option(
        help='Labelled safety set, JSON Lines: {"text", "label": "safe"|"unsafe", "kind"?, "prefix"?}.',
        show_default=False)] = None,
    factuality_file: Annotated[Path | None, typer.Option(
        help='Labelled factuality pairs, JSON Lines: {"reference", "true", "false", "topic"?}.', show_default=False)] = None,
    criteria: Annotated[
        list[str] | None, typer.Option("--criterion", help="safety, quality, factuality (repeatable; default all).",
                                       show_default=False)
    ] = None,
    builtin: Annotated[bool, typer.Option(
        "--builtin", help="Also the in-distribution sets built from the shipped judge-eval data (Austen vs "
                          "RealToxicityPrompts/HarmBench; name swaps).")] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many items per built-in set.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON (safety.auc, "
                                                         "factuality.pair_accuracy, ...).")] = False,
    output: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here.", show_default=False)] = None,
) -> None:
    """Measure the configured judge: safety AUC and accuracy, factuality pair accuracy, quality.

    With --safety-file / --factuality-file, on your labelled sets; otherwise on the shipped held-out test
    split (sources the judge was never prompted or trained with) and the built quality set."""

    cfg = load(config, sets)
    chosen = set(criteria or CRITERIA)
    if chosen - set(CRITERIA):
        raise UserError(f"unknown criterion {sorted(chosen - set(CRITERIA))}; choose from safety, quality, factuality")
    files = safety_file is not None or factuality_file is not None
    safety = read_safety_file(safety_file) if safety_file else None if files else heldout_safety()
    factuality = read_factuality_file(factuality_file) if factuality_file else None if files else heldout_factuality()
    judge = Judge(shared_model(cfg.models.judge), cfg.judge)
    say = (lambda m: None) if as_json else (lambda m: typer.echo(m, err=True))
    figures = {"judge": {"source": cfg.models.judge.source, "mode": cfg.judge.mode, "safety": judge.safety_reading,
                         "factuality": judge.factuality_reading},
               "sets": {"safety": str(safety_file or "held-out test split") if safety else None,
                        "factuality": str(factuality_file or "held-out test split") if factuality else None}}
    figures |= evaluate_judge(judge, safety=safety if "safety" in chosen else None,
                              factuality=factuality if "factuality" in chosen else None, seed=cfg.seed, progress=say)
    builtin_criteria = tuple(c for c in CRITERIA if c in chosen and (builtin or (c == "quality" and not files)))
    if builtin_criteria:
        figures["builtin"] = run_judge_eval(judge, builtin_criteria, limit=limit, seed=cfg.seed, progress=say).as_dict()
    if output is not None:
        output.write_text(json.dumps(figures, indent=2))
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    typer.echo(f"judge {cfg.models.judge.source}: safety by {judge.safety_reading}, factuality by "
               f"{judge.factuality_reading}")
    for line in format_figures(figures):
        typer.echo(line)
    for name, value in figures.get("builtin", {}).items():
        if isinstance(value, float):
            typer.echo(f"built-in {name:18s} {value:.3f}")


@app.command("judge-train")
def judge_train(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Where to write the heads (JSON); point judge.heads at it.")] = Path(
        "judge-heads.json"),
    layer: Annotated[int, typer.Option(help="Hidden layer the safety head reads.")] = DEFAULT_LAYER,
    l2: Annotated[float, typer.Option(help="L2 penalty of the safety head.")] = DEFAULT_L2,
    alpha: Annotated[float, typer.Option(help="Factuality: weight of the unconditional log-probability.")] = DEFAULT_ALPHA,
) -> None:
    """Train the judge model's safety head and factuality calibration from shipped data (seeded by `seed`)."""

    cfg = load(config, sets)
    if cfg.models.judge.backend != "hf":
        raise UserError("judge-train reads the judge model's hidden states: it needs models.judge.backend=hf")
    model = shared_model(cfg.models.judge)
    heads = train_judge_heads(model, cfg.models.judge.source, layer=layer, l2=l2, alpha=alpha, seed=cfg.seed,
                              progress=lambda m: typer.echo(m, err=True))
    heads.save(out)
    typer.echo(json.dumps(heads.trained, indent=1))
    typer.echo(f"heads written to {out}; use them with --set judge.heads={out} --set judge.safety_mode=head "
               "--set judge.factuality_mode=likelihood")


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
