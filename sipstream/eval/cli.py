"""Command-line helpers of `sipstream eval` (the command itself is in `sipstream/cli.py`)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from sipstream.errors import UserError
from sipstream.eval.config import EvalConfig

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
