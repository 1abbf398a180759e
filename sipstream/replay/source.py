"""Where a replay's records come from: a recorded run's directory, manifest, config and archive.

Shared by `replay.run` and `replay.export` (neither imports the other's internals)."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sipstream.bus.broker import EmbeddedBroker
from sipstream.bus.client import check_reachable
from sipstream.config import Config
from sipstream.errors import UserError
from sipstream.runs import manifest as M

EXPORT_NAME = "export.json"
ARCHIVE_DIR = "export"  # where `sipstream run` exports the topics of an in-memory broker, in its run directory

#: What to do when a run's recorded topics are not on the broker a replay was pointed at.
LIVE_RUN_HINT = ("replay on the cluster that holds the run (--bootstrap-servers), or put an export of it back "
                  "first with `sipstream import`")



def pipeline_of(run_dir: Path, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The `sipstream run` a learner run belongs to (its directory holds the pipeline's manifest), else itself."""
    if data.get("kind") == "learner" and (run_dir.parent / M.MANIFEST_NAME).is_file():
        try:
            parent = json.loads((run_dir.parent / M.MANIFEST_NAME).read_text(encoding="utf-8"))
        except ValueError:
            parent = {}
        if parent.get("kind") == "pipeline" and parent.get("learner_run") == run_dir.name:
            return run_dir.parent, parent
    return run_dir, data


def archived(run_dir: Path, data: dict[str, Any]) -> Path | None:
    """The archive folder of a run whose in-memory broker ended with it (None when its topics are live).

    A learner run inside a `sipstream run` directory shares the pipeline's broker, so its archive."""
    run_dir, data = pipeline_of(run_dir, data)
    ephemeral = data.get("bus", {}).get("ephemeral")
    if ephemeral is None and data.get("kind") == "pipeline":  # written before `bus.ephemeral` was recorded
        bus = data.get("config", {}).get("bus", {})
        ephemeral = bus.get("bootstrap_servers") is None and str(bus.get("embedded", {}).get("storage")).startswith(
            "memory://")
    return run_dir / data.get("archive", ARCHIVE_DIR) if ephemeral else None


def check_archive(archive: Path, topics: Sequence[str], run_dir: Path) -> None:
    """One line when a run's archive lacks a topic a replay needs (its broker, and the records, are gone)."""
    try:
        held = json.loads((archive / EXPORT_NAME).read_text(encoding="utf-8"))["topics"]
    except (OSError, ValueError, KeyError):
        held = {}
    missing = [t for t in topics if t not in held]
    if missing:
        raise UserError(f"run {run_dir} ran on an in-memory broker that ended with it, and its archive {archive} "
                        f"holds no {', '.join(missing)}; runs made before `sipstream run` archived every topic "
                        "cannot replay this: run again, or run on a persistent broker (`sipstream broker`)")


@contextmanager
def replay_broker(cfg: Any, bootstrap: str | None) -> Iterator[tuple[str, bool]]:
    """(bootstrap, embedded): the broker given, checked; else an in-memory embedded broker for the
    duration of the replay (its records end with it)."""
    if bootstrap is not None:
        check_reachable(cfg.bus, bootstrap)
        yield bootstrap, False
        return
    broker = EmbeddedBroker(cfg.bus.embedded.model_copy(update={"storage": "memory://tansu/", "port": 0}))
    try:
        yield broker.start(), True
    finally:
        broker.stop()


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S") + f"-{os.urandom(2).hex()}"


def recorded_config(data: dict[str, Any], where: Path) -> Any:
    try:
        return Config.model_validate(data["config"])
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"the config recorded in {where} no longer validates ({'.'.join(map(str, first['loc']))}: "
                        f"{first['msg']}); fix it with --set or replay with the sipstream version that wrote it "
                        f"({data.get('code', {}).get('git_describe') or data.get('code', {}).get('package')})") from None
