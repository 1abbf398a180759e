"""Stage registry: `sipstream worker NAME` builds the stage registered under NAME.

Each stage module exposes `build(cfg) -> Stage`; modules are imported only when their stage runs,
so a worker never pays for another stage's models.
"""

from __future__ import annotations

import importlib

from sipstream.bus.runner import Stage
from sipstream.config import Config
from sipstream.errors import UserError

STAGES: dict[str, str] = {
    "echo": "sipstream.stages.echo",
    "split": "sipstream.stages.split",
    "rewrite": "sipstream.stages.rewrite",
    "rollout": "sipstream.stages.rollout",
    "judge": "sipstream.stages.judge",
    "assemble": "sipstream.stages.assemble",
}


def build_stage(name: str, cfg: Config) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; choose one of: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name]).build(cfg)


def stage_class(name: str) -> type:
    """The `Stage` subclass registered as `name`, without building it (no model is loaded)."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; choose one of: {', '.join(sorted(STAGES))}")
    module = importlib.import_module(STAGES[name])
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Stage) and value is not Stage and value.name == name:
            return value
    raise AssertionError(f"{STAGES[name]} defines no Stage named {name!r}")
