"""The `sipstream` command line. Each command parses options, loads the config and calls a `run_*`
function; heavy libraries (torch, transformers) are imported only inside the functions that need them,
so `sipstream --help` is quick. User errors print one line and exit 2.

- `app`: the typer app, the options every command shares (`--config`, `--set`, `--bootstrap-servers`),
  the one config loader behind them, and `main` (also behind `python -m sipstream.learner`);
- `pipeline`: broker, topics, ingest, worker, learner, run, status, config;
- `runs`: replay learner|stage, export, import;
- `evaluate`: eval, judge-eval, experiment, report.
"""

from __future__ import annotations

# Importing a command module registers its commands on `app`; this order is the order of `sipstream --help`.
# isort: off
from sipstream.cli import pipeline  # noqa: F401
from sipstream.cli import runs  # noqa: F401
from sipstream.cli import evaluate  # noqa: F401
# isort: on
from sipstream.cli.app import app, main

__all__ = ["app", "main"]
