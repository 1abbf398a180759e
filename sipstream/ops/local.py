"""`sipstream run`: the whole loop on one machine.

Starts the embedded broker (unless a cluster is configured), creates the topics, starts every stage as
its own local `sipstream worker` process (as in a deployment: one process per stage), ingests documents,
follows the records to the last topic with a live status line, and stops everything in order
(SIGTERM: each worker finishes its batch and commits; then the broker). A child that crashes is
restarted (up to `local.max_restarts` times) and reported. Everything a run writes goes to its run
directory: the resolved config, one log per process, and the summary.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker
from sipstream.bus.client import client_settings
from sipstream.bus.tail import TopicTail
from sipstream.config import Config, secrets_env
from sipstream.errors import UserError
from sipstream.ops.ingest import (
    BUILTIN_CORPUS,
    Rejected,
    iter_documents,
    produce_documents,
)
from sipstream.ops.lifeline import SUPERVISOR_ENV, terminate_as_interrupt
from sipstream.ops.manifest import pipeline_manifest
from sipstream.replay.export import export_topic
from sipstream.replay.source import ARCHIVE_DIR
from sipstream.runs.manifest import topic_positions
from sipstream.telemetry.logs import get_logger

# The stages `sipstream run` starts, in pipeline order, and the topic whose records mark an item done.
PIPELINE: tuple[str, ...] = ("split", "rewrite", "rollout", "judge", "assemble")
FINAL_TOPIC = T.PAIRS
STATUS_TOPICS = (T.DOCUMENTS, T.PREFIXES, T.REWRITTEN, T.ROLLOUTS, T.JUDGED, T.PAIRS)


@dataclass
class LocalRunResult:
    run_dir: str = ""
    ingested: int = 0
    items: int = 0
    completed: int = 0
    duplicates_removed: int = 0
    deadlettered: int = 0
    chosen_by_kind: dict[str, int] = field(default_factory=dict)
    policy_versions: list[int] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    # The whole run (supervisor, broker, every child) sampled every few seconds: the peak of the summed
    # resident memory, and of the summed proportional set size (shared library pages counted once,
    # split between the processes that map them: what the run really takes from the machine).
    peak_total_rss_mb: float = 0.0
    peak_total_pss_mb: float = 0.0
    first_update_s: float | None = None  # from the start of `run_local` to the first published weights
    exit_codes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of process `pid` so far in MiB (Linux /proc VmHWM); None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_mb(pid: int) -> tuple[float, float] | None:
    """Current resident and proportional set size of process `pid` in MiB (Linux
    /proc/<pid>/smaps_rollup); None when unreadable (the process is gone, or not Linux)."""
    rss = pss = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None if rss is None or pss is None else (rss, pss)


class MemorySampler:
    """Sums the memory of a set of processes, at most every `interval_s`, and keeps the peaks."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self._last = -float("inf")

    def sample(self, pids: list[int]) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        readings = [reading for reading in map(memory_mb, pids) if reading is not None]
        self.peak_rss_mb = max(self.peak_rss_mb, sum(rss for rss, _ in readings))
        self.peak_pss_mb = max(self.peak_pss_mb, sum(pss for _, pss in readings))


class Child:
    """One supervised worker process; its output goes to `<run_dir>/logs/<name>.log`."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env  # None: inherit ours
        self.log_path = log_dir / f"{name}.log"
        self.restarts = 0
        self.finished = False
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        log.write(f"--- start {dt.datetime.now(dt.timezone.utc).isoformat()} argv={self.argv}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()

    def crashed(self) -> int | None:
        return None if self.proc is None or self.proc.poll() is None else self.proc.returncode

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def peak_rss_mb(self) -> float | None:
        """The process's peak resident memory so far, for the run summary."""
        return None if self.proc is None else peak_rss_mb(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # finish the batch, flush, commit, leave the group
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def status_line(tails: dict[str, TopicTail], result: LocalRunResult, chosen: Counter[str], rewards: deque[float]) -> str:
    """items | per stage: items done (backlog waiting for it) | dead letters | policy | reward | curriculum."""
    parts = [f"items {len(tails[T.PREFIXES].ids)}"]
    for stage, (src, dst) in {"rewrite": (T.PREFIXES, T.REWRITTEN), "rollout": (T.REWRITTEN, T.ROLLOUTS),
                              "judge": (T.ROLLOUTS, T.JUDGED), "assemble": (T.JUDGED, T.PAIRS)}.items():
        done, waiting = len(tails[dst].ids), len(tails[src].ids) - len(tails[dst].ids)
        parts.append(f"{stage} {done} (lag {waiting})")
    parts.append(f"dead {result.deadlettered}")
    parts.append(f"policy v{max(result.policy_versions, default=0)}")
    if rewards:
        parts.append(f"chosen reward {sum(rewards) / len(rewards):.2f}")
    total = sum(chosen.values())
    if total:
        parts.append("chosen " + " ".join(f"{k} {n / total:.0%}" for k, n in chosen.most_common()))
    return " | ".join(parts)


MODEL_STAGES = frozenset({"rewrite", "rollout", "judge"})


def process_groups(cfg: Config) -> list[list[str]]:
    """The pipeline's stages grouped into worker processes: `local.colocate`'s groups, every other stage
    alone, in pipeline order of each group's first stage."""
    seen: set[str] = set()
    for group in cfg.local.colocate:
        unknown = [name for name in group if name not in PIPELINE]
        if unknown or len(group) < 2:
            raise UserError(f"local.colocate group {group}: list two or more of {', '.join(PIPELINE)}"
                            + (f" ({', '.join(unknown)} is not one)" if unknown else ""))
        if seen & set(group):
            raise UserError(f"local.colocate puts {sorted(seen & set(group))} in two groups; each stage runs once")
        seen |= set(group)
    groups = [sorted(group, key=PIPELINE.index) for group in cfg.local.colocate]
    groups += [[name] for name in PIPELINE if name not in seen]
    return sorted(groups, key=lambda group: PIPELINE.index(group[0]))


def thread_env(cfg: Config, cores: int | None = None) -> dict[str, str]:
    """OMP_NUM_THREADS for the children: more busy OpenMP threads than cores make every team wait."""
    if cfg.local.threads_per_process is not None:
        return {"OMP_NUM_THREADS": str(cfg.local.threads_per_process)}
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    # Processes with a model: the rewrite, rollout and judge workers (fewer when colocated) + the learner.
    model_groups = sum(1 for group in process_groups(cfg) if MODEL_STAGES & set(group))
    model_processes = model_groups * cfg.local.workers_per_stage + 1
    return {"OMP_NUM_THREADS": str(max(1, (cores or os.cpu_count() or 1) // model_processes))}


def learner_env(cfg: Config, child_env: dict[str, str]) -> dict[str, str]:
    """The learner's environment: the children's, plus glibc's mmap threshold when configured."""
    env = dict(child_env)
    if cfg.local.learner_malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(cfg.local.learner_malloc_mmap_threshold)
    return env


def new_run_dir(cfg: Config) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run_dir) / f"{cfg.run_name}-{stamp}-{os.getpid()}"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run_dir


def run_local(cfg: Config, documents: list[dict] | None = None, sources: list[str] | None = None) -> LocalRunResult:
    """Run the loop until every ingested document's items reached `sip.pairs` (or dead letters)."""

    log = get_logger(component="run")
    process_groups(cfg)  # a bad local.colocate fails before anything starts
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = terminate_as_interrupt()  # `kill`, `timeout`, `docker stop`: the Ctrl-C stop
    run_dir = new_run_dir(cfg)
    result = LocalRunResult(run_dir=str(run_dir))
    started = time.monotonic()
    specs = T.load_specs(T.topics_dir(cfg.bus))
    if documents is None:
        docs: list[Any] = list(iter_documents(sources or [BUILTIN_CORPUS]))
        documents = [d for d in docs if not isinstance(d, Rejected)]
    if cfg.local.max_documents is not None:
        documents = documents[: cfg.local.max_documents]

    broker = None
    children: list[Child] = []
    tails: dict[str, TopicTail] = {}
    chosen: Counter[str] = Counter()
    try:
        bootstrap = cfg.bus.bootstrap_servers
        if bootstrap is None:
            broker = EmbeddedBroker(cfg.bus.embedded)
            bootstrap = broker.start()
        T.create_topics(cfg.bus, bootstrap, specs)
        begin = topic_positions(bootstrap, cfg.bus, list(T.CORE_TOPICS))
        print(f"run directory {run_dir}; broker {bootstrap}", flush=True)

        # Children get the resolved config, so --set and env overrides reach them too; the learner's
        # checkpoints and weights land in this run's directory.
        cfg_file = run_dir / "config.yaml"
        child_cfg = cfg.model_dump(mode="json") | {"run_dir": str(run_dir)}
        cfg_file.write_text(yaml.safe_dump(child_cfg, sort_keys=False))
        common = ["--config", str(cfg_file), "--bootstrap-servers", bootstrap]
        # config.yaml has its credentials redacted; children get them through the environment instead.
        child_env = {**os.environ, **secrets_env(cfg), **thread_env(cfg), SUPERVISOR_ENV: str(os.getpid())}
        for group in process_groups(cfg):
            stages = "+".join(group)  # `sipstream worker rewrite+judge`: one process, a thread per stage
            for k in range(cfg.local.workers_per_stage):
                name = stages if cfg.local.workers_per_stage == 1 else f"{stages}-{k}"
                argv = [sys.executable, "-m", "sipstream", "worker", stages, *common, "--instance-id", f"{name}-local"]
                children.append(Child(name, argv, run_dir / "logs", env=child_env))
        learner = Child("learner", [sys.executable, "-m", "sipstream", "learner", *common], run_dir / "logs",
                        env=learner_env(cfg, child_env))
        children.append(learner)
        for child in children:
            child.start()

        result.ingested = produce_documents(cfg.bus, bootstrap, documents).ingested
        print(f"ingested {result.ingested} documents; stages: {' → '.join(PIPELINE)}", flush=True)

        pair_ids: set[str] = set()
        recent_rewards: deque[float] = deque(maxlen=20)

        def on_pair(pair: dict) -> None:
            # At-least-once: a restarted worker may repeat records; each item counts once (dedupe by item_id).
            if pair["item_id"] in pair_ids:
                result.duplicates_removed += 1
                return
            pair_ids.add(pair["item_id"])
            chosen[pair["chosen"]["kind"] if pair.get("chosen") else "none"] += 1
            if pair.get("chosen"):
                recent_rewards.append(pair["chosen"]["total"])

        def on_weights(announcement: dict) -> None:
            if announcement.get("run_name") == cfg.run_name:
                result.policy_versions.append(announcement["version"])
                if result.first_update_s is None:
                    result.first_update_s = round(time.monotonic() - started, 1)

        callbacks = {FINAL_TOPIC: on_pair, T.WEIGHTS: on_weights}
        for topic in (*STATUS_TOPICS, T.DEADLETTER, T.WEIGHTS):
            tails[topic] = TopicTail(bootstrap, cfg.bus.topic(topic), specs[topic].partitions,
                                     on_record=callbacks.get(topic), id_field="item_id" if topic != T.DOCUMENTS else None,
                                     client=client_settings(cfg.bus))
        deadline = time.monotonic() + cfg.local.timeout_s
        sampler = MemorySampler()

        def run_pids() -> list[int]:
            pids = [os.getpid(), *(child.proc.pid for child in children if child.proc is not None)]
            return pids + ([broker.process.pid] if broker is not None and broker.process is not None else [])
        interactive = sys.stdout.isatty()
        last_line = ""
        while True:
            # Order matters: check that split committed everything *before* reading its output, since
            # split commits only after its items are acknowledged, the poll below then sees them all.
            tails[T.DOCUMENTS].poll(0.05)
            split_done = tails[T.DOCUMENTS].count >= result.ingested and tails[T.DOCUMENTS].committed_by(
                f"{cfg.bus.group_prefix}.{PIPELINE[0]}")
            # Downstream topics first: an item counted downstream is then always counted upstream too, so
            # no stage shows a negative backlog.
            # Short waits: an idle topic costs 50 ms, so a status round takes about a second and
            # --max-items stops the run close to its bound.
            for tail in reversed(list(tails.values())):
                tail.poll(0.05)
            result.items = len(tails[T.PREFIXES].ids)
            result.completed = len(pair_ids)
            result.deadlettered = tails[T.DEADLETTER].count
            sampler.sample(run_pids())
            result.peak_total_rss_mb = round(sampler.peak_rss_mb, 1)
            result.peak_total_pss_mb = round(sampler.peak_pss_mb, 1)
            line = status_line(tails, result, chosen, recent_rewards)
            if line != last_line:
                print(("\r" + line[:200]) if interactive else line, end="" if interactive else "\n", flush=True)
                last_line = line

            if split_done and result.completed + result.deadlettered >= result.items:
                break
            if cfg.local.max_items is not None and result.completed >= cfg.local.max_items:
                log.info("stopping at local.max_items", max_items=cfg.local.max_items)
                break
            for child in children:
                code = child.crashed()
                if code is None or child.finished:
                    continue
                if code == 0:  # e.g. the learner reached learner.max_steps: done, not crashed
                    child.finished = True
                    log.info("process finished", worker=child.name)
                    continue
                if child.restarts >= cfg.local.max_restarts:
                    raise UserError(f"worker {child.name} exited with code {code} {child.restarts + 1} times; "
                                    f"last lines of {child.log_path}: {child.tail()}")
                child.restarts += 1
                log.warning("worker crashed; restarting", worker=child.name, exit_code=code, restarts=child.restarts)
                child.start()
            if time.monotonic() > deadline:
                raise UserError(f"run timed out after {cfg.local.timeout_s:.0f}s with {result.completed}/{result.items} "
                                "items done (raise local.timeout_s or lower local.max_documents)")
            time.sleep(0.5)
        if interactive:
            print(flush=True)
        # The pipeline is done: stop its workers, then the learner, which publishes its last weights.
        for child in children:
            peak = child.peak_rss_mb()
            if peak is not None:
                result.peak_rss_mb[child.name] = round(peak, 1)
            result.exit_codes[child.name] = child.stop()  # type: ignore[assignment]
        tails[T.WEIGHTS].poll(2.0)
        # The record of the run: topic ranges + the learner's manifest, for `sipstream replay`.
        ephemeral = broker is not None and cfg.bus.embedded.storage.startswith("memory://")
        # CPU float sums depend on the thread count: a bit-identical replay of the learner uses its count.
        threads = learner.env.get("OMP_NUM_THREADS") if learner.env else None
        pipeline_manifest(run_dir, cfg, bootstrap, begin, stages=PIPELINE, ephemeral=ephemeral,
                          archive=ARCHIVE_DIR if ephemeral else None,
                          extra={"threads": {"learner": int(threads)}} if threads and threads.isdigit() else None)
        if ephemeral:
            # An in-memory broker forgets everything when it stops: archive every topic a stage or the
            # learner reads (`sipstream replay` puts them back), and the metrics and dead letters
            # `sipstream report` draws from.
            for topic in T.CORE_TOPICS:
                export_topic(topic, run_dir, str(run_dir / ARCHIVE_DIR), bootstrap=bootstrap)
    finally:
        for child in children:
            if child.name not in result.exit_codes:
                result.exit_codes[child.name] = child.stop()  # type: ignore[assignment]
            result.restarts[child.name] = child.restarts
        for tail in tails.values():
            tail.close()
        if broker is not None:
            broker.stop()
        if previous_sigterm is not None:  # a caller in this process gets its own handler back
            signal.signal(signal.SIGTERM, previous_sigterm)
        result.chosen_by_kind = dict(chosen)
        result.seconds = time.monotonic() - started
        (run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2))
    log.info("run finished", **{k: v for k, v in asdict(result).items() if k != "run_dir"})
    first_update = "—" if result.first_update_s is None else f"{result.first_update_s:.0f}s"
    print(
        f"done: {result.ingested} documents → {result.items} items; {result.completed} reached {FINAL_TOPIC}, "
        f"{result.deadlettered} dead-lettered; policy versions published: {len(result.policy_versions)}; "
        f"{result.seconds:.1f}s; first update after {first_update}; peak memory {result.peak_total_pss_mb / 1024:.1f} GiB "
        f"(PSS; RSS {result.peak_total_rss_mb / 1024:.1f} GiB) (summary in {run_dir}/summary.json)",
        flush=True,
    )
    return result
