"""`sipstream worker STAGE`: one stage on the shared runner, stopped gracefully by SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import time

from sipstream.bus.embedded import resolve_bootstrap
from sipstream.bus.runner import RunnerStats, StageRunner
from sipstream.config import Config
from sipstream.errors import UserError
from sipstream.stages import STAGES, build_stage


def run_worker(
    cfg: Config,
    stage_name: str,
    *,
    instance_id: str | None = None,
    static_membership: bool = False,
    max_batches: int | None = None,
) -> RunnerStats:
    if stage_name not in STAGES:
        raise UserError(f"unknown stage {stage_name!r}; choose one of: {', '.join(sorted(STAGES))}")
    bootstrap = resolve_bootstrap(cfg)
    load_started = time.perf_counter()
    stage = build_stage(stage_name, cfg)  # loads the stage's model: the slow part of a worker's start
    runner = StageRunner(stage, cfg, bootstrap, instance_id=instance_id, static_membership=static_membership,
                         model_load_seconds=time.perf_counter() - load_started)
    # The handler only sets a flag: the loop finishes its batch, flushes, commits, then exits.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop())
    return runner.run(max_batches=max_batches)
