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
