"""Commands on recorded runs: `replay learner|stage` (the `replay` sub-app), `export` and `import`. Each
parses options and calls one function of `sipstream.replay.run` or `sipstream.replay.export`; user errors
are `UserError`s, printed as one line by `sipstream.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sipstream.cli.app import (
    BootstrapOpt,
    ConfigOpt,
    OutOpt,
    RunOpt,
    SetOpt,
    app,
    default_logging,
    load,
)
from sipstream.config import load_config
from sipstream.errors import UserError
from sipstream.replay.export import export_topic, import_export, read_export
from sipstream.replay.run import replay_learner, replay_stage

replay_app = typer.Typer(help="Re-run recorded runs from the topics: the learner, or one stage.", no_args_is_help=True)
app.add_typer(replay_app, name="replay")


@replay_app.command("learner")
def learner(
    run: Annotated[
        Path | None, typer.Option("--run", help="Run directory holding manifest.json (of `sipstream learner` or "
                                               "`sipstream run`).", show_default=False)
    ] = None,
    from_offsets: Annotated[
        str | None, typer.Option("--from-offsets", help="Train on these sip.pairs ranges instead of the run's "
                                 "consumption log: PARTITION:FIRST-END,... (END exclusive), read round-robin over "
                                 "partitions. Without --run, --config names the bus and the policy.",
                                 show_default=False)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config for a --from-offsets replay without --run.",
                                  show_default=False)
    ] = None,
    algo: Annotated[
        str | None, typer.Option(help="Train another algorithm (dpo, nll, pretrain) on the same pairs.", show_default=False)
    ] = None,
    bootstrap_servers: BootstrapOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """Re-consume exactly the pairs a learner run trained on, from the same initial weights, into a new run.

    With the algorithm unchanged, the final weights must be bit-identical on CPU: exits 1 when they differ.
    """

    if algo is not None and algo not in ("dpo", "nll", "pretrain"):
        raise UserError(f"--algo must be dpo, nll or pretrain, not {algo!r}")
    if run is None and from_offsets is None:
        raise UserError("replay learner needs --run RUN_DIR (or --from-offsets with --config)")
    if run is not None and config is not None:
        raise UserError("--config is for --from-offsets without --run; a run replays with its recorded config "
                        "(change fields with --set)")
    default_logging()
    cfg = None
    if run is None:

        cfg = load_config(config, [])
    result = replay_learner(run, bootstrap=bootstrap_servers, algo=algo, overrides=sets or [], out_dir=out,
                            from_offsets=from_offsets, config=cfg)
    typer.echo(f"replayed {result.records} records in {result.steps} steps ({result.algo}) into {result.run_dir}")
    typer.echo(f"final weights sha256 {result.final_sha256}")
    if result.original_sha256 is None:
        pass  # nothing recorded to compare with
    elif from_offsets is not None:
        typer.echo(f"original run (its own consumption order): {result.original_sha256}")
    elif result.algo == result.original_algo and not sets:
        if result.identical:
            typer.echo("identical to the original run")
        else:
            typer.echo(f"DIFFERS from the original run ({result.original_sha256})", err=True)
            raise typer.Exit(1)
    else:
        typer.echo(f"original ({result.original_algo}): {result.original_sha256}")


@replay_app.command("stage")
def stage(
    name: Annotated[str, typer.Argument(help="Stage to re-run: split, rewrite, rollout, judge, assemble (or echo).")],
    run: RunOpt,
    bootstrap_servers: BootstrapOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
) -> None:
    """Re-run one stage over the input range a run recorded, into new topics (`replay-<stamp>.` prefix).

    A default `sipstream run` (in-memory broker, gone with the run) replays from its RUN_DIR/export/ archive,
    on --bootstrap-servers or on an embedded broker started for the replay."""

    default_logging()
    result = replay_stage(name, run, bootstrap=bootstrap_servers, overrides=sets or [], out_dir=out, timeout_s=timeout)
    typer.echo(f"stage {name}: {result.input_records} records in → {result.output_records} out, "
               f"{result.deadlettered} dead-lettered; topics under prefix {result.topic_prefix}; manifest in {result.run_dir}")
    if result.archive is not None:
        typer.echo(f"the replay ran on its own in-memory broker; its topics are archived in {result.archive}")


@app.command("export")
def export_command(
    topic: Annotated[str, typer.Argument(help="Topic as specified in topics/, e.g. sip.pairs.")],
    run: RunOpt,
    to: Annotated[str, typer.Option("--to", help="Destination folder or fsspec URI (file://, s3://).")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet.")] = "jsonl",
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Write the range of TOPIC a run recorded to files (with the run's manifest), for archive or another cluster."""

    default_logging()
    entry = export_topic(topic, run, to, fmt=fmt, bootstrap=bootstrap_servers)  # type: ignore[arg-type]
    typer.echo(f"exported {entry['records']} records of {topic} to {to} ({len(entry['files'])} file(s), {fmt})")


@app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(help="Folder or fsspec URI written by `sipstream export`.")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    bootstrap_servers: BootstrapOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Where to write the replayable run (default: under run_dir).",
                                     show_default=False)
    ] = None,
) -> None:
    """Put exported records back on a bus and write a run directory whose offsets point at them."""

    read_export(source)  # a wrong folder is the error to report, whether or not a broker runs
    cfg = load(config, sets, bootstrap_servers)  # the target's bus and topic prefix
    out = import_export(source, cfg, run_dir=run_dir)  # finds the broker after reading the export
    typer.echo(f"imported {source}; replay it with: sipstream replay learner --run {out}")
