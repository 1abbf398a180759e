"""The typer app, the options every command shares, and `main`.

Shared options, declared once and used by every command that reads a config:
`--config/-c`, `--set/-s` (repeatable), `--bootstrap-servers/--bootstrap/-b`; `load` turns them (and a
command's own config-field options) into the validated config and configures logging from it, in one
place. A command module (`pipeline`, `runs`, `evaluate`) registers its commands on `app`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer

from sipstream.config import Config, LoggingConfig, load_config
from sipstream.errors import UserError
from sipstream.telemetry.logs import configure_logging

app = typer.Typer(
    name="sipstream",
    help="Self-improving pretraining as a streaming online-learning engine on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# --------------------------------------------------------------------------- the shared options

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config (default: $SIPSTREAM_CONFIG or configs/tiny.yaml).", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field, e.g. --set runner.batch_size=32 (repeatable).",
                 show_default=False),
]
BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "--bootstrap", "-b", show_default=False,
                 help="Kafka bootstrap servers; overrides bus.bootstrap_servers (a run's: the recorded ones)."),
]
RunOpt = Annotated[
    Path, typer.Option("--run", help="Run directory holding manifest.json (of `sipstream learner` or `sipstream run`).")
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Parent folder of the new run directory (default: next to the original).", show_default=False),
]


def load(config: Path | None, sets: Sequence[str] | None, bootstrap: str | None = None,
         fields: Mapping[str, object] | None = None) -> Config:
    """The config of a command, with logging configured from it.

    Layers, later wins: the file (`--config`) < `SIPSTREAM_*` env < `--set` < the command's own options
    that stand for config fields (`fields`: dotted key → value, None when not given) < `--bootstrap-servers`."""
    overrides = list(sets or [])
    overrides += [f"{key}={value}" for key, value in (fields or {}).items() if value is not None]
    if bootstrap:
        overrides.append(f"bus.bootstrap_servers={bootstrap}")
    cfg = load_config(config, overrides)
    configure_logging(cfg.logging)
    return cfg


def default_logging() -> None:
    """Logging for a command whose config comes later (from a recorded run) or not at all."""
    configure_logging(LoggingConfig())


def main(args: Sequence[str] | None = None) -> None:
    """`sipstream` (and `python -m sipstream.learner`, which passes `learner ...`): user errors are one line, exit 2."""
    try:
        app(args=list(args) if args is not None else None, prog_name="sipstream")
    except UserError as exc:
        typer.echo(f"sipstream: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
