"""Command-line helpers of `sipstream eval` (the command itself is in `sipstream/cli/evaluate.py`): eval settings
from ``--set eval.*``, and which run config an eval uses."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from sipstream.config import default_config_path, load_config
from sipstream.errors import ConfigError, UserError
from sipstream.eval.config import EvalConfig
from sipstream.eval.policy import split_run_ref

if TYPE_CHECKING:
    from sipstream.config import Config

PREFIX = "eval."


def eval_config_from_sets(sets: Sequence[str]) -> tuple[EvalConfig, list[str]]:
    """Split ``--set`` values: ``eval.FIELD=VALUE`` build the :class:`EvalConfig`, the rest are run
    config overrides. A bad eval field or value is a one-line UserError naming it."""
    values: dict[str, str] = {}
    rest: list[str] = []
    for item in sets:
        if not item.startswith(PREFIX):
            rest.append(item)
            continue
        name, sep, value = item[len(PREFIX):].partition("=")
        if not sep or not name:
            raise UserError(f"--set {item}: expected eval.FIELD=VALUE")
        if name not in EvalConfig.model_fields:
            raise UserError(f"--set {item}: unknown eval setting {name!r}; known: {', '.join(EvalConfig.model_fields)}")
        values[name] = None if value.lower() in ("null", "none") else value  # type: ignore[assignment]
    try:
        return EvalConfig.model_validate(values), rest
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise UserError(f"invalid eval setting eval.{field}: {error['msg']}") from None



def run_config_file(run_dir: Path) -> Path | None:
    """Where a run directory records its config: ``config.yaml`` (written by `sipstream run`), else
    ``manifest.json`` (its ``config``; a learner's own directory has only that); None if neither."""
    if (run_dir / "config.yaml").is_file():
        return run_dir / "config.yaml"
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run_dir / "manifest.json" if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict) else None


def _load_recorded(source: Path, overrides: Sequence[str]) -> Config:
    """load_config of a run's config.yaml, or of the config a manifest.json holds (through a temporary
    file: load_config reads files; its errors then name the manifest)."""

    if source.name != "manifest.json":
        return load_config(source, overrides)

    data = json.loads(source.read_text(encoding="utf-8"))["config"]
    with tempfile.TemporaryDirectory(prefix="sipstream-eval-") as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        try:
            return load_config(path, overrides)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(path), f"{source} (its config)")) from None


def load_eval_config(config: Path | None, overrides: Sequence[str], refs: Sequence[str | None]) -> tuple[Config, str]:
    """The run config `sipstream eval` uses, and where it came from (for the log).

    An explicit ``config`` wins. Otherwise the config of the first run directory among ``refs`` (the
    model, then the baseline) that records one, so that ``start`` is the policy that run started from
    and its weights load into the spec they were trained with. Without either: ``$SIPSTREAM_CONFIG``
    or configs/tiny.yaml, as for every other command. ``overrides`` (``--set``) apply in every case."""

    if config is not None:
        return load_config(config, overrides), str(config)
    for ref in refs:
        run = split_run_ref(ref) if ref is not None else None
        source = run_config_file(run[0]) if run is not None else None
        if run is None or source is None:
            continue
        try:
            return _load_recorded(source, overrides), str(source)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the config run {run[0]} recorded; pass --config to use another)") from None
    return load_config(None, overrides), str(os.environ.get("SIPSTREAM_CONFIG") or default_config_path())
