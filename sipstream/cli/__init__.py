"""The `sipstream` command line. Each command parses options, loads the config and calls a `run_*`
function; heavy libraries (torch, transformers) are imported only inside the commands that need them,
so `sipstream --help` is instant. User errors print one line and exit 2.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from sipstream.bus import topics as T
from sipstream.bus.embedded import resolve_bootstrap, run_broker
from sipstream.bus.sync import sync_topics
from sipstream.cli import replay as replay_cli
from sipstream.config import LoggingConfig, load_config
from sipstream.errors import UserError
from sipstream.eval.cli import eval_config_from_sets, load_eval_config
from sipstream.eval.report import markdown_table
from sipstream.eval.run import evaluate
from sipstream.experiment.run import load_experiment, resummarise, run_experiment
from sipstream.learner import run_learner
from sipstream.models import Judge
from sipstream.models.judge_eval import run_judge_eval
from sipstream.ops.ingest import Rejected, iter_documents, produce_documents
from sipstream.ops.lifeline import die_with_supervisor
from sipstream.ops.local import run_local
from sipstream.ops.status import run_status
from sipstream.ops.worker import run_worker
from sipstream.report import write_report
from sipstream.stages.models import shared_model
from sipstream.telemetry.logs import configure_logging

app = typer.Typer(
    name="sipstream",
    help="Self-improving pretraining as a streaming online-learning engine on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
topics_app = typer.Typer(help="Create, list and compare the topics in topics/.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(replay_cli.app, name="replay")
app.command("export")(replay_cli.export_command)
app.command("import")(replay_cli.import_command)

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config (default: $SIPSTREAM_CONFIG or configs/tiny.yaml).", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config field, e.g. --set runner.batch_size=32 (repeatable).", show_default=False),
]
BootstrapOpt = Annotated[
    Optional[str],
    typer.Option("--bootstrap-servers", "-b", help="Kafka bootstrap servers; overrides bus.bootstrap_servers.", show_default=False),
]


def _config(config: Path | None, sets: list[str] | None, bootstrap: str | None = None):  # noqa: ANN202

    overrides = list(sets or [])
    if bootstrap:
        overrides.append(f"bus.bootstrap_servers={bootstrap}")
    cfg = load_config(config, overrides)
    configure_logging(cfg.logging)
    return cfg


@app.command()
def broker(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port (default: a free one).", show_default=False)] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default 127.0.0.1).", show_default=False)] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(help="Tansu storage engine: memory://tansu/ or s3://BUCKET/ (AWS_* env for S3).", show_default=False),
    ] = None,
    create_topics: Annotated[bool, typer.Option(help="Create the topics from topics/ once ready.")] = True,
) -> None:
    """Start the embedded Kafka-protocol broker (Tansu) and keep it running until Ctrl-C / SIGTERM."""

    overrides = list(sets or [])
    for key, value in (("port", port), ("host", host), ("storage", storage)):
        if value is not None:
            overrides.append(f"bus.embedded.{key}={value}")
    run_broker(_config(config, overrides), create_topics=create_topics)


@topics_app.command("create")
def topics_create(config: ConfigOpt = None, sets: SetOpt = None, bootstrap_servers: BootstrapOpt = None) -> None:
    """Create every topic of topics/ that does not exist yet (idempotent)."""

    cfg = _config(config, sets, bootstrap_servers)
    bootstrap = resolve_bootstrap(cfg)
    for name, status in sorted(T.create_topics(cfg.bus, bootstrap, T.load_specs(T.topics_dir(cfg.bus))).items()):
        typer.echo(f"{name:20s} {status}")


@topics_app.command("list")
def topics_list(config: ConfigOpt = None, sets: SetOpt = None, bootstrap_servers: BootstrapOpt = None) -> None:
    """List live topics with their partition counts."""

    cfg = _config(config, sets, bootstrap_servers)
    for name, partitions in T.list_topics(cfg.bus, resolve_bootstrap(cfg)).items():
        typer.echo(f"{name:20s} {partitions} partition(s)")


@topics_app.command("sync")
def topics_sync(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    apply: Annotated[bool, typer.Option("--apply", help="Make the changes (default: dry run).")] = False,
) -> None:
    """Make live topics match topics/: create missing, raise partitions, set retention/configs (never lowers)."""

    cfg = _config(config, sets, bootstrap_servers)
    report = sync_topics(cfg.bus, resolve_bootstrap(cfg), T.load_specs(T.topics_dir(cfg.bus)), apply=apply)
    for line in report.lines():
        typer.echo(line)
    if not apply and report.actions:
        typer.echo("dry run: nothing changed; add --apply")
    if not report.ok:
        raise typer.Exit(1)


@topics_app.command("describe")
def topics_describe(config: ConfigOpt = None, sets: SetOpt = None, bootstrap_servers: BootstrapOpt = None) -> None:
    """Compare each spec in topics/ with the live topic; exit 1 when any differs."""

    cfg = _config(config, sets, bootstrap_servers)
    specs = T.load_specs(T.topics_dir(cfg.bus))
    states = T.describe_topics(cfg.bus, resolve_bootstrap(cfg), specs)
    for st, spec in zip(states, specs.values(), strict=True):
        status = "ok" if st.ok else "DIFFERS: " + "; ".join(st.differences)
        typer.echo(f"{st.name:20s} partitions={st.partitions or '-'} retention.ms={st.configs.get('retention.ms', '?')} key={spec.key}  {status}")
    if not all(st.ok for st in states):
        raise typer.Exit(1)


@app.command()
def worker(
    stage: Annotated[str, typer.Argument(help="Stage to run: split, rewrite, rollout, judge, assemble (or echo, a diagnostics copy).")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    instance_id: Annotated[
        Optional[str], typer.Option(help="Stable worker id (default: stage-host-pid).", show_default=False)
    ] = None,
    static: Annotated[
        bool, typer.Option(help="Static group membership: a restart with the same --instance-id keeps its partitions.")
    ] = False,
    max_batches: Annotated[Optional[int], typer.Option(help="Stop after this many batches.", show_default=False)] = None,
) -> None:
    """Run one stage as a stream processor until Ctrl-C / SIGTERM."""

    die_with_supervisor()
    cfg = _config(config, sets, bootstrap_servers)
    run_worker(cfg, stage, instance_id=instance_id, static_membership=static, max_batches=max_batches)


@app.command()
def ingest(
    sources: Annotated[
        list[str],
        typer.Argument(help="Files, folders, globs or fsspec URLs (file://, s3://); `builtin:public_domain` is the shipped corpus."),
    ],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (by extension), text, jsonl or parquet.")] = "auto",
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field holding the text.")] = "text",
    id_field: Annotated[
        Optional[str], typer.Option(help="Field holding a document id (default: a hash of the text).", show_default=False)
    ] = None,
    max_document_bytes: Annotated[int, typer.Option(help="Larger documents are rejected to the dead-letter topic.")] = 10 * 1024 * 1024,
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many documents.", show_default=False)] = None,
) -> None:
    """Put documents on sip.documents; bad ones go to sip.deadletter with the reason."""


    if fmt not in ("auto", "text", "jsonl", "parquet"):
        raise UserError(f"--format must be auto, text, jsonl or parquet, not {fmt!r}")
    cfg = _config(config, sets, bootstrap_servers)
    bootstrap = resolve_bootstrap(cfg)
    docs = iter_documents(sources, fmt, text_field, id_field, max_document_bytes)  # type: ignore[arg-type]
    if limit is not None:
        counted = 0

        def under_limit(d: object) -> bool:
            nonlocal counted
            counted += not isinstance(d, Rejected)
            return counted <= limit

        docs = itertools.takewhile(under_limit, docs)
    report = produce_documents(cfg.bus, bootstrap, docs, progress=True)
    rejected = ", ".join(f"{n} {reason}" for reason, n in report.rejected.most_common()) or "none"
    typer.echo(f"ingested {report.ingested} documents in {report.seconds:.1f}s; rejected: {rejected}")


@app.command()
def learner(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    algo: Annotated[
        Optional[str], typer.Option(help="dpo (online DPO), nll (reward-filtered NLL) or pretrain (next-token baseline).",
                                    show_default=False)
    ] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.", show_default=False)] = None,
    idle_timeout: Annotated[
        Optional[float], typer.Option(help="Stop when no pairs arrived for this many seconds.", show_default=False)
    ] = None,
    instance_id: Annotated[Optional[str], typer.Option(help="Stable learner id.", show_default=False)] = None,
) -> None:
    """Train the policy from sip.pairs and publish weights to sip.weights (resumes from its checkpoint)."""

    overrides = list(sets or [])
    for key, value in (("algo", algo), ("max_steps", max_steps), ("idle_timeout_s", idle_timeout)):
        if value is not None:
            overrides.append(f"learner.{key}={value}")

    die_with_supervisor()
    cfg = _config(config, overrides, bootstrap_servers)
    run_learner(cfg, resolve_bootstrap(cfg), instance_id=instance_id)


@app.command("judge-eval")
def judge_eval(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    criteria: Annotated[
        Optional[list[str]], typer.Option("--criterion", help="safety, quality, factuality (repeatable; default all).",
                                          show_default=False)
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many items per criterion.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help="Also write the figures as JSON here.", show_default=False)] = None,
) -> None:
    """Measure the configured judge on labelled sets built from package-shipped public data."""


    cfg = _config(config, sets)
    chosen = tuple(criteria or ("safety", "quality", "factuality"))
    bad = set(chosen) - {"safety", "quality", "factuality"}
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


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config as YAML.")] = True,
) -> None:
    """Validate the config and print it resolved (file < SIPSTREAM_* env < --set)."""

    cfg = _config(config, sets)
    if show:
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())


@app.command()
def run(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    source: Annotated[
        Optional[list[str]],
        typer.Option(help="Documents to ingest (as `sipstream ingest`); default: the shipped public-domain corpus.",
                     show_default=False),
    ] = None,
    max_documents: Annotated[
        Optional[int], typer.Option(help="Ingest at most this many documents (local.max_documents).", show_default=False)
    ] = None,
    max_steps: Annotated[
        Optional[int], typer.Option(help="The learner stops after this many optimizer steps.", show_default=False)
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Worker processes per stage (local.workers_per_stage).", show_default=False)
    ] = None,
    max_items: Annotated[
        Optional[int], typer.Option(help="Stop once this many items reached sip.pairs (local.max_items).", show_default=False)
    ] = None,
) -> None:
    """Run the whole loop on one machine, on the embedded broker unless a cluster is configured.

    Creates the topics, starts every stage as a local process, ingests the shipped public-domain
    corpus and stops once it has flowed through.
    """

    overrides = list(sets or [])
    for key, value in (("local.max_documents", max_documents), ("learner.max_steps", max_steps),
                       ("local.workers_per_stage", workers), ("local.max_items", max_items)):
        if value is not None:
            overrides.append(f"{key}={value}")
    run_local(_config(config, overrides, bootstrap_servers), sources=source)


@app.command()
def status(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON snapshot and exit (for scripts).")] = False,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between readings (rates are measured over them).", min=0.1)] = 2.0,
) -> None:
    """Live view of a running system from the bus: throughput, consumer lag, dead letters, policy, learner."""

    cfg = _config(config, sets, bootstrap_servers)
    run_status(cfg, resolve_bootstrap(cfg), as_json=as_json, once=once, interval_s=interval)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `sipstream run`.", show_default=False)],
) -> None:
    """Plot reward, curriculum, learner loss and evals of a run; write RUN_DIR/report/index.html."""

    configure_logging()
    typer.echo(f"report: {write_report(run_dir)}")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="start, a .safetensors file, a run directory or RUN_DIR@VERSION.")],
    baseline: Annotated[str, typer.Option(help="Reference to compare against (same forms), or none.")] = "start",
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", show_default=False,
                     help="YAML config (default: the config.yaml of the run directory --model or --baseline names, "
                          "so 'start' is that run's starting checkpoint; else $SIPSTREAM_CONFIG or configs/tiny.yaml)."),
    ] = None,
    sets: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Override a config field, or an eval setting as eval.FIELD=VALUE (repeatable).",
                     show_default=False),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write eval.json, eval.md and eval_samples.jsonl here.",
                                                show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Measure a policy against a baseline on held-out data: win rate, safety, factuality, quality."""


    eval_cfg, config_sets = eval_config_from_sets(sets or [])
    baseline_ref = None if baseline.lower() == "none" else baseline
    cfg, config_source = load_eval_config(config, config_sets, [model, baseline_ref])
    configure_logging(cfg.logging)
    result = evaluate(cfg, model, baseline_ref, eval_cfg, out, config_source=config_source)
    typer.echo(json.dumps(result, indent=1) if as_json else markdown_table(result))


@app.command()
def experiment(
    config: Annotated[Path, typer.Argument(help="Experiment YAML, e.g. configs/experiments/cpu.yaml; or a finished "
                                                 "experiment's results.json to rewrite its tables and plots.")],
    sets: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Override an experiment field, e.g. --set seeds=[1] or --set steps=4.",
                     show_default=False),
    ] = None,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Compare pretrain / nll / dpo from one starting checkpoint on the same stream, evaluate every arm.

    Writes results.json, results.md and plots into a new directory under the experiment's out_dir.
    """

    configure_logging(LoggingConfig())
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


def main() -> None:
    try:
        app(prog_name="sipstream")
    except UserError as exc:
        typer.echo(f"sipstream: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
