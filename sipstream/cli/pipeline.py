"""Commands that build and run the pipeline: `broker`, `topics ...`, `ingest`, `worker`, `learner`, `run`,
`status`, `config`. Each loads the config through `app.load` and calls one `run_*` function."""

from __future__ import annotations

import itertools
from typing import Annotated

import typer
import yaml

from sipstream.bus import topics as T
from sipstream.bus.embedded import resolve_bootstrap, run_broker
from sipstream.bus.sync import sync_topics
from sipstream.cli.app import BootstrapOpt, ConfigOpt, SetOpt, app, load
from sipstream.errors import UserError
from sipstream.learner import run_learner
from sipstream.ops.ingest import Rejected, iter_documents, produce_documents
from sipstream.ops.lifeline import die_with_supervisor
from sipstream.ops.local import run_local
from sipstream.ops.status import run_status
from sipstream.ops.worker import prepare_exit, run_worker

topics_app = typer.Typer(help="Create, list and compare the topics in topics/.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@app.command()
def broker(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: a free one).", show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).", show_default=False)] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Tansu storage engine: memory://tansu/ or s3://BUCKET/ (AWS_* env for S3).", show_default=False),
    ] = None,
    create_topics: Annotated[bool, typer.Option(help="Create the topics from topics/ once ready.")] = True,
) -> None:
    """Start the embedded Kafka-protocol broker (Tansu) and keep it running until Ctrl-C / SIGTERM."""

    cfg = load(config, sets, fields={"bus.embedded.port": port, "bus.embedded.host": host,
                                     "bus.embedded.storage": storage})
    run_broker(cfg, create_topics=create_topics)


# --------------------------------------------------------------------------- topics


@topics_app.command("create")
def topics_create(config: ConfigOpt = None, sets: SetOpt = None, bootstrap_servers: BootstrapOpt = None) -> None:
    """Create every topic of topics/ that does not exist yet (idempotent)."""

    cfg = load(config, sets, bootstrap_servers)
    bootstrap = resolve_bootstrap(cfg)
    for name, status in sorted(T.create_topics(cfg.bus, bootstrap, T.load_specs(T.topics_dir(cfg.bus))).items()):
        typer.echo(f"{name:20s} {status}")


@topics_app.command("list")
def topics_list(config: ConfigOpt = None, sets: SetOpt = None, bootstrap_servers: BootstrapOpt = None) -> None:
    """List live topics with their partition counts."""

    cfg = load(config, sets, bootstrap_servers)
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

    cfg = load(config, sets, bootstrap_servers)
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

    cfg = load(config, sets, bootstrap_servers)
    specs = T.load_specs(T.topics_dir(cfg.bus))
    states = T.describe_topics(cfg.bus, resolve_bootstrap(cfg), specs)
    for st, spec in zip(states, specs.values(), strict=True):
        status = "ok" if st.ok else "DIFFERS: " + "; ".join(st.differences)
        typer.echo(f"{st.name:20s} partitions={st.partitions or '-'} retention.ms={st.configs.get('retention.ms', '?')} "
                   f"key={spec.key}  {status}")
    if not all(st.ok for st in states):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- the processes of the loop


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
        str | None, typer.Option(help="Field holding a document id (default: a hash of the text).", show_default=False)
    ] = None,
    max_document_bytes: Annotated[int, typer.Option(help="Larger documents are rejected to the dead-letter topic.")] = 10 * 1024 * 1024,
    limit: Annotated[int | None, typer.Option(help="Stop after this many documents.", show_default=False)] = None,
) -> None:
    """Put documents on sip.documents; bad ones go to sip.deadletter with the reason."""

    if fmt not in ("auto", "text", "jsonl", "parquet"):
        raise UserError(f"--format must be auto, text, jsonl or parquet, not {fmt!r}")
    cfg = load(config, sets, bootstrap_servers)
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
def worker(
    stage: Annotated[str, typer.Argument(help="Stage to run: split, rewrite, rollout, judge, assemble (or echo, a diagnostics copy).")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    instance_id: Annotated[
        str | None, typer.Option(help="Stable worker id (default: stage-host-pid).", show_default=False)
    ] = None,
    static: Annotated[
        bool, typer.Option(help="Static group membership: a restart with the same --instance-id keeps its partitions.")
    ] = False,
    max_batches: Annotated[int | None, typer.Option(help="Stop after this many batches.", show_default=False)] = None,
) -> None:
    """Run one stage as a stream processor until Ctrl-C / SIGTERM."""

    die_with_supervisor()
    cfg = load(config, sets, bootstrap_servers)
    run_worker(cfg, stage, instance_id=instance_id, static_membership=static, max_batches=max_batches)


@app.command()
def learner(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    algo: Annotated[
        str | None, typer.Option(help="dpo (online DPO), nll (reward-filtered NLL) or pretrain (next-token baseline).",
                                 show_default=False)
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.", show_default=False)] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Stop when no pairs arrived for this many seconds.", show_default=False)
    ] = None,
    instance_id: Annotated[str | None, typer.Option(help="Stable learner id.", show_default=False)] = None,
) -> None:
    """Train the policy from sip.pairs and publish weights to sip.weights (resumes from its checkpoint).

    Also `python -m sipstream.learner` with the same options: what torchrun launches."""

    die_with_supervisor()
    cfg = load(config, sets, bootstrap_servers,
               fields={"learner.algo": algo, "learner.max_steps": max_steps, "learner.idle_timeout_s": idle_timeout})
    run_learner(cfg, resolve_bootstrap(cfg), instance_id=instance_id)
    prepare_exit()  # trained, published, checkpointed: a late stop signal must not turn the exit into -15


@app.command()
def run(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    source: Annotated[
        list[str] | None,
        typer.Option(help="Documents to ingest (as `sipstream ingest`); default: the shipped public-domain corpus.",
                     show_default=False),
    ] = None,
    max_documents: Annotated[
        int | None, typer.Option(help="Ingest at most this many documents (local.max_documents).", show_default=False)
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="The learner stops after this many optimizer steps.", show_default=False)
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes per stage (local.workers_per_stage).", show_default=False)
    ] = None,
    max_items: Annotated[
        int | None, typer.Option(help="Stop once this many items reached sip.pairs (local.max_items).", show_default=False)
    ] = None,
) -> None:
    """Run the whole loop on one machine, on the embedded broker unless a cluster is configured.

    Creates the topics, starts every stage as a local process, ingests the shipped public-domain
    corpus and stops once it has flowed through.
    """

    cfg = load(config, sets, bootstrap_servers,
               fields={"local.max_documents": max_documents, "learner.max_steps": max_steps,
                       "local.workers_per_stage": workers, "local.max_items": max_items})
    run_local(cfg, sources=source)


# --------------------------------------------------------------------------- looking at it


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

    cfg = load(config, sets, bootstrap_servers)
    run_status(cfg, resolve_bootstrap(cfg), as_json=as_json, once=once, interval_s=interval)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config as YAML.")] = True,
) -> None:
    """Validate the config and print it resolved (file < SIPSTREAM_* env < --set)."""

    cfg = load(config, sets)
    if show:
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
