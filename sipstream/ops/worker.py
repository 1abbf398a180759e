"""`sipstream worker STAGE`: one stage on the shared runner, stopped gracefully by SIGTERM/SIGINT.

`sipstream worker rewrite+judge` runs several stages in one process, each on its own thread with its own
runner (consumer group, commits, metrics), sharing the models they have in common: the laptop default
puts rewrite and judge together so the judge model is loaded once.

`run_worker` owns its process: it installs the stop signals' handlers (SIGTERM or SIGINT finishes the batch in
hand; the same signal again leaves it uncommitted), and once its loop has ended it prepares the process's
exit (`prepare_exit`).
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from sipstream.bus.embedded import resolve_bootstrap
from sipstream.bus.runner import RunnerStats, StageRunner
from sipstream.config import Config
from sipstream.errors import UserError
from sipstream.stages import STAGES, build_stage
from sipstream.stages.models import serialise_shared_models


def parse_stages(spec: str) -> list[str]:
    """`rewrite+judge` → ["rewrite", "judge"], each a known stage, none twice."""
    names = [name.strip() for name in spec.split("+")]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise UserError(f"unknown stage {', '.join(map(repr, unknown)) or repr(spec)}; choose from: "
                        f"{', '.join(sorted(STAGES))} (join several with '+', e.g. rewrite+judge)")
    if len(set(names)) != len(names):
        raise UserError(f"stage listed twice in {spec!r}")
    return names


def stop_on_signals(stop: Callable[[], None], abandon: Callable[[], None]) -> None:
    """SIGTERM or SIGINT: finish the batch in hand, commit and leave. The same signal a second time: leave the
    batch in hand now, uncommitted (`StageRunner.abandon`; it is handed out again, nothing is lost).

    Counted per signal, as `sipstream run` needs: Ctrl-C in its terminal reaches a worker as SIGINT and the
    supervisor's stop as SIGTERM, which together are one stop; the supervisor's second SIGTERM, when the
    worker is past its grace, or a second Ctrl-C, is the one that abandons."""
    received: set[int] = set()

    def handler(signum: int, frame: Any) -> None:
        if signum in received:
            abandon()
        else:
            received.add(signum)
            stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def prepare_exit() -> None:
    """The loop has ended (flushed, committed, left the group): the process is only exiting now.

    Its interpreter's teardown garbage-collects every object torch and transformers made: 1.7 s for one
    worker at load 4, ~19 s when five tore down at once on 2 busy cores, most of an interrupted run's stop.
    gc.freeze() takes them out of the collector's sight (the process ends; nothing is left to collect):
    0.4 s. And a late second SIGTERM must not kill the teardown (Python restores the default handler
    there, so it would read as a crash, -15): stop signals are ignored from here on."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    gc.freeze()


def run_worker(
    cfg: Config,
    stage_name: str,
    *,
    instance_id: str | None = None,
    static_membership: bool = False,
    max_batches: int | None = None,
) -> RunnerStats:
    names = parse_stages(stage_name)
    if len(names) > 1:
        return run_stages(cfg, names, instance_id=instance_id, static_membership=static_membership,
                          max_batches=max_batches)[-1]
    bootstrap = resolve_bootstrap(cfg)
    load_started = time.perf_counter()
    stage = build_stage(names[0], cfg)  # loads the stage's model: the slow part of a worker's start
    runner = StageRunner(stage, cfg, bootstrap, instance_id=instance_id, static_membership=static_membership,
                         model_load_seconds=time.perf_counter() - load_started)
    # The first signal only sets a flag: the loop finishes its batch, flushes, commits, then exits.
    stop_on_signals(runner.stop, runner.abandon)
    try:
        return runner.run(max_batches=max_batches)
    finally:
        prepare_exit()


def run_stages(
    cfg: Config,
    names: list[str],
    *,
    instance_id: str | None = None,
    static_membership: bool = False,
    max_batches: int | None = None,
) -> list[RunnerStats]:
    """Several stages in this process, one thread and runner each; returns their stats in order.

    A health port other than 0 is shared out as port, port+1, ... in the order given. If one runner
    fails, the others are stopped and the error is raised (the process exits non-zero, so a supervisor
    restarts the group)."""

    serialise_shared_models()
    bootstrap = resolve_bootstrap(cfg)
    runners: list[StageRunner] = []
    for index, name in enumerate(names):
        stage_cfg = cfg
        port = cfg.runner.health_port
        if port:
            stage_cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"health_port": port + index})})
        load_started = time.perf_counter()
        stage = build_stage(name, stage_cfg)  # a model already loaded by an earlier stage is reused
        runners.append(StageRunner(stage, stage_cfg, bootstrap, instance_id=instance_id and f"{instance_id}-{name}",
                                   static_membership=static_membership,
                                   model_load_seconds=time.perf_counter() - load_started))

    def stop_all(*_: object) -> None:
        for runner in runners:
            runner.stop()

    def abandon_all() -> None:  # from the main thread: each runner's loop thread is told to leave its batch
        for runner in runners:
            runner.abandon()

    stop_on_signals(stop_all, abandon_all)
    results: list[RunnerStats | None] = [None] * len(runners)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = runners[index].run(max_batches=max_batches)
        except BaseException as error:
            errors.append(error)
            stop_all()

    threads = [threading.Thread(target=run, args=(index,), name=f"stage-{name}", daemon=True)
               for index, name in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # join with a timeout: the main thread keeps handling signals
            thread.join(timeout=0.5)
    prepare_exit()
    if errors:
        raise errors[0]
    return [result for result in results if result is not None]
