"""`sipstream run`: the whole loop on one machine.

Starts the embedded broker (unless a cluster is configured), creates the topics, starts every stage as
its own local `sipstream worker` process (as in a deployment: one process per stage) and the learner,
ingests documents as the learner keeps up (`local.max_items_in_flight`: rollouts never run so far ahead
that their pairs arrive stale), follows the records to the last topic with a live status line, and stops.

Stopping, at the end or on Ctrl-C / SIGTERM: every child gets SIGTERM at once (a worker finishes its
batch and commits; the learner finishes its step, publishes, checkpoints and commits), each within its
own timeout (`local.stop_timeout_s`, `local.learner_stop_timeout_s`; a second Ctrl-C kills what is
left). On an interrupt a worker finishes its batch only within `INTERRUPT_GRACE_S`; then a second SIGTERM
makes it leave the batch uncommitted (handed out again on the next run). Then the run's record is written
while the broker still holds the topics: `manifest.json`, and for an in-memory broker an `export/` archive
of every topic (all partitions read at once), so `sipstream replay` works on an interrupted run too. Then
the broker stops and `summary.json` is written (pairs judged, trained and dropped by reason; each child's
exit code, and why one was killed). An interrupted run exits with 130 (the shell's code for Ctrl-C) after
writing its record. A child that crashes is restarted (up to `local.max_restarts` times) and reported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker
from sipstream.bus.client import client_settings
from sipstream.bus.records import parse_weights_announcement
from sipstream.bus.tail import TopicTail
from sipstream.config import Config, secrets_env
from sipstream.errors import UserError
from sipstream.learner.losses import ALGOS
from sipstream.ops.ingest import (
    BUILTIN_CORPUS,
    Rejected,
    iter_documents,
    produce_documents,
)
from sipstream.ops.lifeline import SUPERVISOR_ENV, terminate_as_interrupt
from sipstream.ops.manifest import pipeline_manifest
from sipstream.replay.export import export_topics
from sipstream.replay.source import ARCHIVE_DIR
from sipstream.runs.manifest import MANIFEST_NAME, topic_positions
from sipstream.telemetry.logs import get_logger

# The stages `sipstream run` starts, in pipeline order, and the topic whose records mark an item done.
PIPELINE: tuple[str, ...] = ("split", "rewrite", "rollout", "judge", "assemble")
FINAL_TOPIC = T.PAIRS
STATUS_TOPICS = (T.DOCUMENTS, T.PREFIXES, T.REWRITTEN, T.ROLLOUTS, T.JUDGED, T.PAIRS)
# Dead letters of these stages are items that never reach the learner (split's are documents).
ITEM_STAGES = frozenset({"rewrite", "rollout", "judge", "assemble"})
# On Ctrl-C / SIGTERM a worker gets this long to finish the batch in hand; then a second SIGTERM makes it
# leave the batch uncommitted (handed out again on the next run: nothing is lost). A judge batch of the
# tiny models took 11-16 s to finish on 2 loaded cores, most of an interrupted run's stop.
INTERRUPT_GRACE_S = 3.0


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
    killed: dict[str, str] = field(default_factory=dict)
    """Children killed at the stop, and why (an exit code of -9 with no entry here came from elsewhere)."""
    stopped_by: str = ""
    """`finished` (every item done), `max_items`, `interrupt` (Ctrl-C / SIGTERM) or `error`."""
    max_items_in_flight: int | None = None
    """The admission bound this run used (None: every document ingested at the start)."""
    pairs: dict[str, Any] = field(default_factory=dict)
    """judged (distinct items on sip.pairs), trainable (with what the algorithm needs), trained, and
    dropped by reason (tie, stale, duplicate, ..., `not_trained`: judged but not yet trained at the stop)."""
    judge_flags: dict[str, Any] = field(default_factory=dict)
    """How the judge saw the stream's own text: originals judged, flagged unsafe (safety below
    judge.safety_threshold), and the share flagged."""
    stop_seconds: dict[str, float] = field(default_factory=dict)
    """How long the stop took: `children` (all of them, in parallel) and `record`: `manifest` (reading where
    every topic ends) then `archive` (the export of an in-memory broker's topics)."""
    child_stop_seconds: dict[str, float] = field(default_factory=dict)
    """How long each child took to stop, from its first SIGTERM to its exit."""
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


class _Spawner:
    """Starts child processes from one thread that lives as long as this process.

    Why: children of `sipstream run` ask for SIGKILL when their parent dies (PR_SET_PDEATHSIG,
    ops/lifeline.py), and Linux sends it when the *thread* that forked the child exits, not the process.
    A child started from a short-lived thread would be killed with that thread. The main thread lives as
    long as the process, so it forks directly; any other thread hands the fork to this one."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(argv, **kwargs)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="sipstream-spawner", daemon=True)
                self._thread.start()
        future: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((future, argv, kwargs))
        return future.result()

    def _serve(self) -> None:
        while True:
            future, argv, kwargs = self._requests.get()
            try:
                future.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as error:
                future.set_exception(error)


_SPAWNER = _Spawner()


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
        log = open(self.log_path, "ab")
        log.write(f"--- start {dt.datetime.now(dt.UTC).isoformat()} argv={self.argv}\n".encode())
        log.flush()
        self.proc = _SPAWNER.popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
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

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: finish the batch, flush, commit, leave the group); returns at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


@dataclass
class StopOutcome:
    exit_codes: dict[str, int] = field(default_factory=dict)
    killed: dict[str, str] = field(default_factory=dict)
    """Children killed with SIGKILL, and why."""
    seconds: dict[str, float] = field(default_factory=dict)
    """How long each child took to stop, from the SIGTERM."""


def stop_children(children: list[Child], timeouts: dict[str, float], default_timeout_s: float,
                  hurry: threading.Event | None = None, grace: dict[str, float] | None = None) -> StopOutcome:
    """SIGTERM every child at once, then wait for each until its own timeout (`timeouts[name]`, else
    `default_timeout_s`, counted from the SIGTERM) and kill it past that, or at once when `hurry` is set
    (a second Ctrl-C). A child named in `grace` still running that many seconds after the SIGTERM gets
    a second one: a worker then leaves the batch in hand uncommitted (`StageRunner.abandon`). A stop takes
    the longest child's time, not the sum. Children never started are left out."""
    outcome = StopOutcome()
    pending = [child for child in children if child.proc is not None]
    for child in pending:
        child.terminate()
    sent = time.monotonic()
    second_due = dict(grace or {})  # when each child not yet sent its second SIGTERM is due one
    while pending:
        waited = time.monotonic() - sent
        for child in list(pending):
            assert child.proc is not None
            code = child.proc.poll()
            if code is None and second_due.get(child.name, float("inf")) <= waited:
                del second_due[child.name]
                child.terminate()
            timeout = timeouts.get(child.name, default_timeout_s)
            if code is None and (waited >= timeout or (hurry is not None and hurry.is_set())):
                child.proc.kill()
                code = child.proc.wait()
                outcome.killed[child.name] = (f"past its {timeout:g}s stop timeout" if waited >= timeout
                                              else f"interrupted again after {waited:.0f}s of its stop")
            if code is not None:
                outcome.exit_codes[child.name] = code
                outcome.seconds[child.name] = round(time.monotonic() - sent, 1)
                pending.remove(child)
        time.sleep(0.05)
    return outcome


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
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run_dir) / f"{cfg.run_name}-{stamp}-{os.getpid()}"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run_dir


def items_in_flight_limit(cfg: Config) -> int | None:
    """`local.max_items_in_flight` resolved: the pairs the learner takes within `max_policy_lag` versions."""
    limit = cfg.local.max_items_in_flight
    if limit == "unbounded":
        return None
    if limit == "auto":
        lcfg = cfg.learner
        return max(1, lcfg.max_policy_lag) * lcfg.batch_pairs * lcfg.grad_accum * lcfg.sync_every
    return int(limit)


class RunProgress:
    """What `sipstream run` reads from the bus: items per topic, pairs (deduplicated by item_id), policy
    versions, item dead letters and the learner's own counters (its sip.metrics records)."""

    def __init__(self, cfg: Config, bootstrap: str, specs: dict[str, Any], result: LocalRunResult) -> None:
        self.cfg = cfg
        self.result = result
        self.started = time.monotonic()
        self.started_at = time.time()
        self.continuations = ALGOS[cfg.learner.algo].continuations  # what makes a pair trainable
        self.doc_ids: set[str] = set()  # documents split into items so far
        self.pair_ids: set[str] = set()
        self.trainable = 0
        self.chosen: Counter[str] = Counter()
        self.rewards: deque[float] = deque(maxlen=20)
        self.item_deadletters = 0
        self.learner_counters: dict[str, float] = {}
        self.learner_step = 0
        self.judged_ids: set[str] = set()
        self.originals_flagged = 0
        callbacks = {T.PREFIXES: self._on_prefix, T.JUDGED: self._on_judged, FINAL_TOPIC: self._on_pair, T.WEIGHTS: self._on_weights, T.METRICS: self._on_metrics,
                     T.DEADLETTER: self._on_deadletter}
        self.tails = {
            topic: TopicTail(bootstrap, cfg.bus.topic(topic), specs[topic].partitions, on_record=callbacks.get(topic),
                             id_field="item_id" if topic in STATUS_TOPICS[1:] else None, client=client_settings(cfg.bus))
            for topic in (*STATUS_TOPICS, T.DEADLETTER, T.WEIGHTS, T.METRICS)
        }

    def _on_prefix(self, prefix: dict) -> None:
        self.doc_ids.add(prefix["doc_id"])

    def _on_judged(self, judged: dict) -> None:
        if judged["item_id"] in self.judged_ids:
            return
        self.judged_ids.add(judged["item_id"])
        original = next((s for s in judged.get("scores", []) if s.get("kind") == "original"), None)
        self.originals_flagged += original is not None and original["safety"] < self.cfg.judge.safety_threshold

    def judge_flags(self) -> dict[str, Any]:
        judged = len(self.judged_ids)
        return {"originals_judged": judged, "originals_flagged_unsafe": self.originals_flagged,
                "share_flagged": round(self.originals_flagged / judged, 4) if judged else None}

    def _on_pair(self, pair: dict) -> None:
        # At-least-once: a restarted worker may repeat records; each item counts once (dedupe by item_id).
        if pair["item_id"] in self.pair_ids:
            self.result.duplicates_removed += 1
            return
        self.pair_ids.add(pair["item_id"])
        self.trainable += all(pair.get(name) is not None for name in self.continuations)
        self.chosen[pair["chosen"]["kind"] if pair.get("chosen") else "none"] += 1
        if pair.get("chosen"):
            self.rewards.append(pair["chosen"]["total"])

    def _on_weights(self, value: dict) -> None:
        announcement = parse_weights_announcement(value)
        if announcement["run_name"] == self.cfg.run_name:
            self.result.policy_versions.append(announcement["version"])
            self.learner_step = max(self.learner_step, announcement["step"])
            if self.result.first_update_s is None:
                self.result.first_update_s = round(time.monotonic() - self.started, 1)

    def _on_metrics(self, value: dict) -> None:
        if value.get("source") == "learner" and value.get("ts", 0) >= self.started_at:  # not an earlier run's
            self.learner_counters = value.get("counters") or {}

    def _on_deadletter(self, value: dict) -> None:
        self.item_deadletters += value.get("stage") in ITEM_STAGES

    def poll(self) -> bool:
        """Read what is new; True when split has consumed and committed every ingested document."""
        # Order matters: check that split committed everything *before* reading its output, since
        # split commits only after its items are acknowledged, the poll below then sees them all.
        documents = self.tails[T.DOCUMENTS]
        documents.poll(0.05)
        split_done = documents.count >= self.result.ingested and documents.committed_by(
            f"{self.cfg.bus.group_prefix}.{PIPELINE[0]}")
        # Downstream topics first: an item counted downstream is then always counted upstream too, so no
        # stage shows a negative backlog. Short waits: an idle topic costs 50 ms, so a status round takes
        # about a second and --max-items stops the run close to its bound.
        for tail in reversed(list(self.tails.values())):
            tail.poll(0.05)
        self.result.items = len(self.tails[T.PREFIXES].ids)
        self.result.completed = len(self.pair_ids)
        self.result.deadlettered = self.tails[T.DEADLETTER].count
        return split_done

    def trained(self) -> int:
        """Pairs the learner trained on, as far as it has told: its counters, or its steps so far."""
        lcfg = self.cfg.learner
        return max(int(self.learner_counters.get("pairs_trained", 0)),
                   self.learner_step * lcfg.batch_pairs * lcfg.grad_accum)

    def in_flight(self, unsplit_documents: int) -> int:
        """Items admitted that the learner has not yet trained on or dropped: those before sip.pairs
        (`unsplit_documents` counted at their most items each) and the trainable pairs after it."""
        per_document = self.cfg.items.max_items_per_document or 1
        upstream = self.result.items - self.result.completed - self.item_deadletters + unsplit_documents * per_document
        dropped = sum(self.learner_counters.get(name, 0) for name in ("dropped_stale", "skipped_empty", "deadlettered"))
        return max(0, upstream) + max(0, self.trainable - self.trained() - int(dropped))

    def pairs_summary(self, learner_counters: dict[str, float] | None = None) -> dict[str, Any]:
        """Pairs judged, trainable, trained, and dropped by reason (from the learner's final counters)."""
        counters = learner_counters or self.learner_counters
        dropped: dict[str, int] = {}
        for name, value in counters.items():
            reason = name.removeprefix("dropped_").removeprefix("skipped_")
            if reason != name and value:
                dropped[{"no_rejected": "tie"}.get(reason, reason)] = int(value)
        if counters.get("deadlettered"):
            dropped["deadlettered"] = int(counters["deadlettered"])
        trained = int(counters.get("pairs_trained", 0))
        judged = len(self.pair_ids)
        accounted = trained + sum(n for reason, n in dropped.items() if reason != "duplicate")
        if judged > accounted:
            dropped["not_trained"] = judged - accounted  # read after the last step, or not read at all
        return {"judged": judged, "trainable": self.trainable, "trained": trained, "dropped": dropped}

    def close(self) -> None:
        for tail in self.tails.values():
            tail.close()


def status_line(progress: RunProgress) -> str:
    """items | per stage: items done (backlog waiting for it) | dead letters | policy | trained | reward | curriculum."""
    tails, result = progress.tails, progress.result
    parts = [f"items {len(tails[T.PREFIXES].ids)}"]
    for stage, (src, dst) in {"rewrite": (T.PREFIXES, T.REWRITTEN), "rollout": (T.REWRITTEN, T.ROLLOUTS),
                              "judge": (T.ROLLOUTS, T.JUDGED), "assemble": (T.JUDGED, T.PAIRS)}.items():
        done, waiting = len(tails[dst].ids), len(tails[src].ids) - len(tails[dst].ids)
        parts.append(f"{stage} {done} (lag {waiting})")
    parts.append(f"dead {result.deadlettered}")
    parts.append(f"policy v{max(result.policy_versions, default=0)}")
    parts.append(f"trained {progress.trained()}")
    if progress.rewards:
        parts.append(f"chosen reward {sum(progress.rewards) / len(progress.rewards):.2f}")
    total = sum(progress.chosen.values())
    if total:
        parts.append("chosen " + " ".join(f"{k} {n / total:.0%}" for k, n in progress.chosen.most_common()))
    return " | ".join(parts)


class Admission:
    """Ingests documents as the learner keeps up: at most `limit` items in flight (None: all at once)."""

    def __init__(self, cfg: Config, bootstrap: str, documents: list[dict], limit: int | None) -> None:
        self.cfg, self.bootstrap, self.documents, self.limit = cfg, bootstrap, documents, limit
        self.admitted = 0

    @property
    def done(self) -> bool:
        return self.admitted >= len(self.documents)

    def admit(self, progress: RunProgress, split_done: bool) -> int:
        """Produce the next documents that fit; returns how many. Never stalls: below the limit at least
        one document goes in (the learner may be waiting for one more pair to fill its step)."""
        if self.done:
            return 0
        count = len(self.documents) - self.admitted
        if self.limit is not None:
            unsplit = 0 if split_done else self.admitted - len(progress.doc_ids)
            room = self.limit - progress.in_flight(max(0, unsplit))
            per_document = self.cfg.items.max_items_per_document or 1
            count = min(count, max(1 if room > 0 else 0, room // per_document))
        if count:
            batch = self.documents[self.admitted:self.admitted + count]
            ingested = produce_documents(self.cfg.bus, self.bootstrap, batch).ingested
            self.admitted += count
            progress.result.ingested += ingested
        return count


def load_documents(cfg: Config, documents: list[dict] | None, sources: list[str] | None) -> list[dict]:
    if documents is None:
        docs: list[Any] = list(iter_documents(sources or [BUILTIN_CORPUS]))
        documents = [d for d in docs if not isinstance(d, Rejected)]
    return documents if cfg.local.max_documents is None else documents[: cfg.local.max_documents]


@contextmanager
def second_interrupt_hurries(hurry: threading.Event) -> Iterator[None]:
    """While stopping: Ctrl-C or SIGTERM again sets `hurry` (kill what is left) instead of raising in the
    middle of the stop, so the run's record is still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: hurry.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LocalRun:
    """One `sipstream run`: its broker, children and progress; started, followed, then stopped and recorded."""

    def __init__(self, cfg: Config, run_dir: Path, result: LocalRunResult) -> None:
        self.cfg, self.run_dir, self.result = cfg, run_dir, result
        self.log = get_logger(component="run")
        self.specs = T.load_specs(T.topics_dir(cfg.bus))
        self.broker: EmbeddedBroker | None = None
        self.bootstrap: str | None = None
        self.begin: dict[str, dict[int, int]] = {}
        self.children: list[Child] = []
        self.progress: RunProgress | None = None

    # --- start: broker, topics, children (each with the resolved config), the bus readers ---
    def start(self) -> None:
        cfg = self.cfg
        bootstrap = cfg.bus.bootstrap_servers
        if bootstrap is None:
            self.broker = EmbeddedBroker(cfg.bus.embedded)
            bootstrap = self.broker.start()
        self.bootstrap = bootstrap
        T.create_topics(cfg.bus, bootstrap, self.specs)
        self.begin = topic_positions(bootstrap, cfg.bus, list(T.CORE_TOPICS))
        print(f"run directory {self.run_dir}; broker {bootstrap}", flush=True)
        self.children = self._children(bootstrap)
        for child in self.children:
            child.start()
        self.progress = RunProgress(cfg, bootstrap, self.specs, self.result)

    def _children(self, bootstrap: str) -> list[Child]:
        cfg, logs = self.cfg, self.run_dir / "logs"
        # Children get the resolved config, so --set and env overrides reach them too; the learner's
        # checkpoints and weights land in this run's directory.
        cfg_file = self.run_dir / "config.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {"run_dir": str(self.run_dir)}, sort_keys=False))
        common = ["--config", str(cfg_file), "--bootstrap-servers", bootstrap]
        # config.yaml has its credentials redacted; children get them through the environment instead.
        child_env = {**os.environ, **secrets_env(cfg), **thread_env(cfg), SUPERVISOR_ENV: str(os.getpid())}
        children = []
        for group in process_groups(cfg):
            stages = "+".join(group)  # `sipstream worker rewrite+judge`: one process, a thread per stage
            for k in range(cfg.local.workers_per_stage):
                name = stages if cfg.local.workers_per_stage == 1 else f"{stages}-{k}"
                argv = [sys.executable, "-m", "sipstream", "worker", stages, *common, "--instance-id", f"{name}-local"]
                children.append(Child(name, argv, logs, env=child_env))
        children.append(Child("learner", [sys.executable, "-m", "sipstream", "learner", *common], logs,
                              env=learner_env(cfg, child_env)))
        return children

    # --- follow: admit documents, read progress, restart crashed children, until done ---
    def follow(self, documents: list[dict]) -> str:
        """Returns why it stopped: `finished` or `max_items` (raises on a timeout or too many crashes)."""
        cfg, result, progress = self.cfg, self.result, self.progress
        assert progress is not None and self.bootstrap is not None
        limit = items_in_flight_limit(cfg)
        result.max_items_in_flight = limit
        admission = Admission(cfg, self.bootstrap, documents, limit)
        admission.admit(progress, split_done=False)
        more = "" if admission.done else (f" of {len(documents)} (the rest as the learner keeps up: at most {limit} "
                                          "items in flight, local.max_items_in_flight)")
        print(f"ingested {result.ingested} documents{more}; stages: {' → '.join(PIPELINE)}", flush=True)
        deadline = time.monotonic() + cfg.local.timeout_s
        sampler, interactive, last_line = MemorySampler(), sys.stdout.isatty(), ""
        while True:
            split_done = progress.poll()
            if admission.admit(progress, split_done):
                continue  # new documents: split is no longer done
            sampler.sample(self._pids())
            result.peak_total_rss_mb = round(sampler.peak_rss_mb, 1)
            result.peak_total_pss_mb = round(sampler.peak_pss_mb, 1)
            line = status_line(progress)
            if line != last_line:
                print(("\r" + line[:200]) if interactive else line, end="" if interactive else "\n", flush=True)
                last_line = line
            if admission.done and split_done and result.completed + result.deadlettered >= result.items:
                stopped_by = "finished"
                break
            if cfg.local.max_items is not None and result.completed >= cfg.local.max_items:
                self.log.info("stopping at local.max_items", max_items=cfg.local.max_items)
                stopped_by = "max_items"
                break
            self._restart_crashed()
            if time.monotonic() > deadline:
                raise UserError(f"run timed out after {cfg.local.timeout_s:.0f}s with {result.completed}/{result.items} "
                                "items done (raise local.timeout_s or lower local.max_documents)")
            time.sleep(0.5)
        if interactive:
            print(flush=True)
        return stopped_by

    def _pids(self) -> list[int]:
        pids = [os.getpid(), *(child.proc.pid for child in self.children if child.proc is not None)]
        return pids + ([self.broker.process.pid] if self.broker is not None and self.broker.process is not None else [])

    def _restart_crashed(self) -> None:
        for child in self.children:
            code = child.crashed()
            if code is None or child.finished:
                continue
            if code == 0:  # e.g. the learner reached learner.max_steps: done, not crashed
                child.finished = True
                self.log.info("process finished", worker=child.name)
                continue
            if child.restarts >= self.cfg.local.max_restarts:
                raise UserError(f"worker {child.name} exited with code {code} {child.restarts + 1} times; "
                                f"last lines of {child.log_path}: {child.tail()}")
            child.restarts += 1
            self.log.warning("worker crashed; restarting", worker=child.name, exit_code=code, restarts=child.restarts)
            child.start()

    # --- stop: every child at once; then the record (manifest, archive) while the broker holds the topics ---
    def stop(self) -> None:
        result, hurry = self.result, threading.Event()
        with second_interrupt_hurries(hurry):
            if result.stopped_by == "interrupt":
                print("\ninterrupted: stopping the workers and the learner (its final publish and checkpoint); "
                      "Ctrl-C again kills them now", flush=True)
            for child in self.children:
                peak = child.peak_rss_mb()
                if peak is not None:
                    result.peak_rss_mb[child.name] = round(peak, 1)
            stop_started = time.monotonic()
            # Interrupted: a worker gets INTERRUPT_GRACE_S to finish its batch, then leaves it uncommitted;
            # the learner keeps its orderly stop (it trains and checkpoints what it holds).
            grace = ({child.name: INTERRUPT_GRACE_S for child in self.children if child.name != "learner"}
                     if result.stopped_by == "interrupt" else None)
            outcome = stop_children(self.children, {"learner": self.cfg.local.learner_stop_timeout_s},
                                    self.cfg.local.stop_timeout_s, hurry, grace)
            result.stop_seconds["children"] = round(time.monotonic() - stop_started, 1)
            result.child_stop_seconds.update(outcome.seconds)
            result.exit_codes.update(outcome.exit_codes)
            result.killed.update(outcome.killed)
            for name, why in outcome.killed.items():
                self.log.warning("child killed at the stop", worker=name, why=why)
            for child in self.children:
                result.restarts[child.name] = child.restarts
            try:
                self._account_pairs()
                record_started = time.monotonic()
                self._record()
                result.stop_seconds["record"] = round(time.monotonic() - record_started, 1)
            except Exception as error:  # the run's own error (if any) is the one to raise
                self.log.error("could not write the run's record", error=repr(error)[:500])
                if result.stopped_by != "error":
                    raise
            finally:
                if self.progress is not None:
                    self.progress.close()
                if self.broker is not None:
                    self.broker.stop()

    def _account_pairs(self) -> None:
        """Pairs judged, trained and dropped, from the learner's final counters: its manifest (written at
        its orderly stop), else its last sip.metrics record."""
        progress = self.progress
        if progress is None:
            return
        deadline = time.monotonic() + 3.0  # the last pairs, weights and metrics the children produced
        while time.monotonic() < deadline and sum(progress.tails[t].poll(0.3) for t in (T.PAIRS, T.WEIGHTS, T.METRICS)):
            pass
        counters = None
        learner_manifest = self.run_dir / self.cfg.run_name / MANIFEST_NAME
        if learner_manifest.is_file():
            recorded = json.loads(learner_manifest.read_text())
            if recorded.get("status") == "finished":  # else its last metrics are newer than its last checkpoint
                counters = recorded.get("counters")
        self.result.pairs = progress.pairs_summary(counters)
        self.result.chosen_by_kind = dict(progress.chosen)
        self.result.judge_flags = progress.judge_flags()

    def _record(self) -> None:
        """manifest.json (every topic's range, who produced and consumed it, the models' sha256) and, for an
        in-memory broker, which forgets everything when it stops, an archive of every topic a stage or
        the learner reads (`sipstream replay` puts them back), and the metrics and dead letters `sipstream
        report` draws from."""
        if self.bootstrap is None:
            return
        cfg, run_dir = self.cfg, self.run_dir
        ephemeral = self.broker is not None and cfg.bus.embedded.storage.startswith("memory://")
        # CPU float sums depend on the thread count: a bit-identical replay of the learner uses its count.
        threads = self.children[-1].env.get("OMP_NUM_THREADS") if self.children and self.children[-1].env else None
        status = {"finished": "finished", "max_items": "finished", "interrupt": "interrupted"}.get(
            self.result.stopped_by, "failed")
        extra: dict[str, Any] = {"status": status}
        if threads and threads.isdigit():
            extra["threads"] = {"learner": int(threads)}
        started = time.monotonic()
        pipeline_manifest(run_dir, cfg, self.bootstrap, self.begin, stages=PIPELINE, ephemeral=ephemeral,
                          archive=ARCHIVE_DIR if ephemeral else None, extra=extra)
        self.result.stop_seconds["manifest"] = round(time.monotonic() - started, 1)
        if ephemeral:  # every partition of every topic read at once (one consumer each)
            started = time.monotonic()
            export_topics(list(T.CORE_TOPICS), run_dir, str(run_dir / ARCHIVE_DIR), bootstrap=self.bootstrap)
            self.result.stop_seconds["archive"] = round(time.monotonic() - started, 1)


def run_local(cfg: Config, documents: list[dict] | None = None, sources: list[str] | None = None) -> LocalRunResult:
    """Run the loop until every ingested document's items reached `sip.pairs` (or dead letters).

    Ctrl-C / SIGTERM stops it the same way and writes the same record, then raises KeyboardInterrupt
    (the CLI exits with 130). Children are started from the calling thread (see `_Spawner`)."""
    process_groups(cfg)  # a bad local.colocate fails before anything starts
    documents = load_documents(cfg, documents, sources)
    run_dir = new_run_dir(cfg)
    result = LocalRunResult(run_dir=str(run_dir))
    started = time.monotonic()
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = terminate_as_interrupt()  # `kill`, `timeout`, `docker stop`: the Ctrl-C stop
    run = LocalRun(cfg, run_dir, result)
    try:
        run.start()
        result.stopped_by = run.follow(documents)
    except KeyboardInterrupt:
        result.stopped_by = "interrupt"
        raise
    except BaseException:
        result.stopped_by = "error"
        raise
    finally:
        try:
            run.stop()
        finally:
            if previous_sigterm is not None:  # a caller in this process gets its own handler back
                signal.signal(signal.SIGTERM, previous_sigterm)
            result.seconds = time.monotonic() - started
            (run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2))
            print_summary(result)
    return result


def print_summary(result: LocalRunResult) -> None:
    get_logger(component="run").info("run finished", **{k: v for k, v in asdict(result).items() if k != "run_dir"})
    first_update = "—" if result.first_update_s is None else f"{result.first_update_s:.0f}s"
    pairs, flags = result.pairs, result.judge_flags
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(pairs.get("dropped", {}).items())) or "none"
    head = "interrupted" if result.stopped_by == "interrupt" else "done"
    print(
        f"{head}: {result.ingested} documents → {result.items} items; {result.completed} reached {FINAL_TOPIC}, "
        f"{result.deadlettered} dead-lettered; pairs judged {pairs.get('judged', 0)}, trained {pairs.get('trained', 0)}, "
        f"dropped: {dropped}; originals judged unsafe {flags.get('originals_flagged_unsafe', 0)} of "
        f"{flags.get('originals_judged', 0)}; policy versions published: {len(result.policy_versions)}; "
        f"{result.seconds:.1f}s; first update after {first_update}; peak memory {result.peak_total_pss_mb / 1024:.1f} GiB "
        f"(PSS; RSS {result.peak_total_rss_mb / 1024:.1f} GiB) (summary in {result.run_dir}/summary.json)",
        flush=True,
    )
    if result.killed:
        print(f"killed at the stop: {', '.join(f'{name} ({why})' for name, why in result.killed.items())}", flush=True)
