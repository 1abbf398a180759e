"""Crash faults: in one `sipstream run` on a broker with the durable s3:// engine (local moto server), kill -9 of
every stage worker (split, rewrite, rollout, judge, assemble) and of the learner, each while it holds work it has
not committed, at different moments, and kill -9 of the broker itself. Afterwards every ingested item reached
sip.pairs exactly once after dedupe, the learner looked at every pair record once, trained no item twice and
skipped none, and no record was lost.

Each kill is checked to have landed mid-batch, from what the process itself reports:
- a stage worker: its /metrics `sipstream_records_consumed_total` (read just before the kill) exceeds the records
  its log says it committed (`batch committed` events, read after the kill): it died holding consumed records
  past its committed offset;
- assemble, in addition, dies after producing a batch's pairs and before committing it (`record processed`
  events after its last `batch committed`), so its successor pairs those items again: real duplicates on
  sip.pairs, which the dedupe by item_id must remove (the run's count, and the learner's consumption log);
- the learner: pair records it had been able to read for 2 s were in no line of its consumption log, so it died
  with a step in progress (collecting or training; a step is accounted only once trained).
Recovery of each: from the kill to the successor's first commit (stage), first published weights (learner), or
from the broker's restart to the next item reaching sip.pairs.

Scope kept apart (not repeated here): the learner's bit-exact resume after kill -9 is
tests/integration/learner/test_learner_on_bus.py; one killed worker of every stage with two workers per stage is
tests/integration/test_run_local.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker, free_port
from sipstream.config import EmbeddedBrokerConfig, project_root
from sipstream.runs.consumption import iter_records, read_log

DOCUMENTS = 10
ITEMS = 2 * DOCUMENTS  # smoke.yaml cuts 2 items per document (these are long enough)
# Long documents make split's batches take ~1 s (tokenizing), so it can be caught holding one.
DOC_CHARS = 300_000
BATCH = 4  # runner.batch_size
STAGES = ("split", "rewrite", "rollout", "judge", "assemble")
VICTIMS = (*STAGES, "learner")
MIN_GAP_S = 3.0  # between two faults: each lands at its own moment
MAX_TRIES = 3  # kills per victim that may miss their window (the batch committed first) before the test gives up
HELD_FOR_S = 2.0  # the learner has been able to read a pair record for this long


def write_documents(path: Path) -> None:
    """DOCUMENTS long documents cut from the shipped corpus, each starting at a different place."""
    corpus = project_root() / "sipstream" / "data" / "corpus" / "public_domain.jsonl"
    text = "\n\n".join(json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines())
    with path.open("w", encoding="utf-8") as out:
        for i in range(DOCUMENTS):
            start = i * len(text) // DOCUMENTS
            rotated = text[start:] + "\n\n" + text[:start]
            body = (rotated * (DOC_CHARS // len(rotated) + 1))[:DOC_CHARS]
            out.write(json.dumps({"doc_id": f"crash{i:02d}", "text": body, "source": "crash-faults"}) + "\n")


# --------------------------------------------------------------------------- what a process reports (Linux /proc)


def cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on (its health server), from its socket fds and /proc/net/tcp."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        inodes = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            return int(fields[1].split(":")[1], 16)
    return None


def consumed_total(port: int) -> float | None:
    """`sipstream_records_consumed_total` from a worker's /metrics (None while it cannot answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sipstream_records_consumed_total{"))


def wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Until `pid` is a zombie or gone (its parent, `sipstream run`, reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return
        except (OSError, IndexError):
            return
        time.sleep(0.005)


# --------------------------------------------------------------------------- what a process logged


def segment(log: Path, start: int | None = None) -> tuple[int, bytes]:
    """One process's part of a log `sipstream run` appends to across restarts: from `start` (default: the last
    `--- start` line) to the next `--- start` line."""
    data = log.read_bytes() if log.exists() else b""
    begin = data.rfind(b"--- start") if start is None else start
    end = data.find(b"\n--- start", max(begin, 0) + 1)
    return max(begin, 0), data[max(begin, 0): end if end >= 0 else len(data)]


def events(text: bytes, name: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith(b"{") and f'"event": "{name}"'.encode() in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wall(event: dict) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def committed_records(text: bytes) -> int:
    """Records a runner committed, from its debug `batch committed` events."""
    return sum(int(e["records"]) for e in events(text, "batch committed"))


def produced_uncommitted(text: bytes) -> int:
    """Outputs produced after the runner's last commit (debug `record processed` events come after produce)."""
    last_commit = text.rfind(b'"event": "batch committed"')
    return text.count(b'"event": "record processed"', max(last_commit, 0))


def read_topic(bootstrap: str, topic: str, partitions: int, quiet_s: float = 3.0) -> list[dict]:
    """Every record of a topic, read to the end (the s3 engine's high watermark is wrong: no watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reliability-reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out, quiet_since = [], time.monotonic()
    try:
        while time.monotonic() - quiet_since < quiet_s:
            batch = [m for m in consumer.consume(500, timeout=0.3) if m.error() is None]
            if batch:
                quiet_since = time.monotonic()
            out.extend({"partition": m.partition(), "offset": m.offset(), "value": json.loads(m.value())} for m in batch)
    finally:
        consumer.close()
    return out


@dataclass
class Fault:
    victim: str
    at_s: float  # since the run started
    held: int  # stage: records consumed past its commits; learner: pair records read, not accounted
    produced_uncommitted: int = 0  # assemble: pairs produced after its last commit
    recovery_s: float | None = None
    wall: float = 0.0


class Injector:
    """Watches one `sipstream run` and kills each victim once it holds uncommitted work (see the module doc)."""

    def __init__(self, run_dir: Path, started: float) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.run_dir, self.started = run_dir, started
        self.cfg_file = f"{run_dir}/config.yaml"
        self.faults: dict[str, Fault] = {}
        self.missed: Counter[str] = Counter()
        self.last_fault = -float("inf")
        self.pids: dict[str, int] = {}
        self.ports: dict[int, int] = {}
        self.pairs: dict[tuple[int, int], tuple[str, float]] = {}  # position → (item_id, when this test saw it)
        self.distinct_at: list[tuple[float, int]] = []  # (time, distinct items paired so far)
        self.bootstrap = ""
        self._reader = None
        self._consumer_cls, self._tp = Consumer, TopicPartition

    def attach(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._reader = self._consumer_cls({"bootstrap.servers": bootstrap, "group.id": "crash-watch",
                                           "enable.auto.commit": False, "log.connection.close": False})
        self._reader.assign([self._tp(T.PAIRS, p, 0) for p in range(T.load_specs()[T.PAIRS].partitions)])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def log(self, victim: str) -> Path:
        return self.run_dir / "logs" / f"{victim}.log"

    def distinct(self) -> int:
        return self.distinct_at[-1][1] if self.distinct_at else 0

    def read_pairs(self) -> None:
        seen = {item for item, _ in self.pairs.values()}
        for msg in self._reader.consume(500, timeout=0):
            if msg.error() is None:
                item = json.loads(msg.value())["item_id"]
                self.pairs[(msg.partition(), msg.offset())] = (item, time.monotonic())
                if item not in seen:
                    seen.add(item)
                    self.distinct_at.append((time.monotonic(), len(seen)))

    def refresh_pids(self) -> None:
        needles = {stage: f"worker {stage} --config {self.cfg_file}" for stage in STAGES}
        needles["learner"] = f"learner --config {self.cfg_file}"
        lines = cmdlines()
        self.pids = {victim: pid for victim, needle in needles.items() for pid, line in lines.items() if needle in line}
        for pid in self.pids.values():
            if self.ports.get(pid) is None:
                self.ports[pid] = listening_port(pid)  # type: ignore[assignment]

    def gap_ok(self) -> bool:
        return time.monotonic() - self.last_fault >= MIN_GAP_S

    def _kill(self, victim: str, pid: int) -> tuple[float, float] | None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it had just exited by itself; the supervisor restarts it
            return None
        at, when = time.monotonic(), time.time()
        wait_dead(pid)
        self.last_fault = at
        return at, when

    def _land(self, fault: Fault | None, victim: str) -> None:
        if fault is None:
            self.missed[victim] += 1
            assert self.missed[victim] < MAX_TRIES, f"{victim}: {MAX_TRIES} kills missed their batch"
        else:
            self.faults[victim] = fault

    def try_stage(self, stage: str) -> bool:
        """Kill `stage` if it holds consumed records it has not committed; True when a kill was made."""
        pid = self.pids.get(stage)
        port = self.ports.get(pid) if pid else None
        if not port:
            return False
        consumed = consumed_total(port)
        start, text = segment(self.log(stage))
        if consumed is None or consumed <= committed_records(text):
            return False
        killed = self._kill(stage, pid)
        if killed is None:
            return False
        at, when = killed
        _, text = segment(self.log(stage), start)  # everything the killed process logged
        held = int(consumed - committed_records(text))
        self._land(Fault(stage, round(at - self.started, 1), held, wall=when) if held > 0 else None, stage)
        return True

    def try_assemble(self) -> bool:
        """Kill assemble after it produced a batch's pairs and before it committed the batch."""
        start, text = segment(self.log("assemble"))
        if not produced_uncommitted(text):
            return False
        noticed = time.monotonic()
        pid = self.pids.get("assemble")
        port = self.ports.get(pid) if pid else None
        consumed = consumed_total(port) if port else None
        if consumed is None:
            return False
        # The produce request leaves within linger.ms (5) and flush() starts at once; the commit comes after the
        # broker has acknowledged it.
        time.sleep(max(0.0, 0.01 - (time.monotonic() - noticed)))
        killed = self._kill("assemble", pid)
        if killed is None:
            return False
        at, when = killed
        _, text = segment(self.log("assemble"), start)
        held, produced = int(consumed - committed_records(text)), produced_uncommitted(text)
        fault = Fault("assemble", round(at - self.started, 1), held, produced, wall=when) if held > 0 and produced else None
        self._land(fault, "assemble")
        return True

    def try_learner(self) -> bool:
        """Kill the learner while pair records it has been able to read for HELD_FOR_S are in no consumption line."""
        pid = self.pids.get("learner")
        _, text = segment(self.log("learner"))
        started = events(text, "learner started")
        if not pid or not started or time.time() - wall(started[0]) < HELD_FOR_S:
            return False
        log_path = self.run_dir / "smoke" / "consumption.jsonl"
        accounted = set(iter_records(read_log(log_path))) if log_path.exists() else set()
        now = time.monotonic()
        if not [p for p, (_, seen) in self.pairs.items() if p not in accounted and now - seen >= HELD_FOR_S]:
            return False
        killed = self._kill("learner", pid)
        if killed is None:
            return False
        at, when = killed
        accounted = set(iter_records(read_log(log_path))) if log_path.exists() else set()  # before a successor cuts it
        held = [p for p, (_, seen) in self.pairs.items() if p not in accounted and at - seen >= HELD_FOR_S]
        self._land(Fault("learner", round(at - self.started, 1), len(held), wall=when) if held else None, "learner")
        return True

    def recoveries(self) -> None:
        """From each kill to the successor's first commit (stage) or first published weights (learner)."""
        for victim, fault in self.faults.items():
            if victim in STAGES:
                later = [wall(e) for e in events(self.log(victim).read_bytes(), "batch committed") if wall(e) > fault.wall]
            else:
                later = [wall(e) for e in events(self.log(victim).read_bytes(), "weights published") if wall(e) > fault.wall]
            fault.recovery_s = round(min(later) - fault.wall, 2) if later else None


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~3 min on 2 idle cores; the bounds below are for a loaded machine
def test_kill_9_of_every_stage_the_learner_and_the_s3_broker_loses_nothing(tmp_path: Path, moto_s3, s3_bucket, figures) -> None:
    storage = s3_bucket("tansu-crash")
    env = {**os.environ, **moto_s3, "SIPSTREAM_HOME": str(tmp_path)}
    broker_cfg = EmbeddedBrokerConfig(port=free_port(), storage=storage)
    broker = EmbeddedBroker(broker_cfg, env=env)
    bootstrap = broker.start()
    write_documents(tmp_path / "documents.jsonl")
    stderr = open(tmp_path / "run.stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--source", str(tmp_path / "documents.jsonl"), "--max-documents", str(DOCUMENTS),
         "--set", f"run_dir={tmp_path}", "--set", f"bus.bootstrap_servers={bootstrap}",
         "--set", "local.max_restarts=8", "--set", f"runner.batch_size={BATCH}",
         # What the injector reads: every process's /metrics on a free port, and the runner's debug events
         # (`record processed` after produce, `batch committed` after commit).
         "--set", "runner.health_port=0", "--set", "logging.level=debug",
         # The learner takes 6 pairs a step while assemble hands out 4 a batch: it holds a partial step most of
         # the time. A checkpoint each step: a killed learner resumes where it was, not from the start.
         "--set", "learner.batch_pairs=6", "--set", "learner.checkpoint_every=1", "--set", "learner.max_policy_lag=100",
         # Torch's own thread count per child (2 here), not `sipstream run`'s one-per-process share: with one
         # thread each the tiny models can finish before the faults are injected.
         "--set", "local.threads_per_process=2"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
    )
    started = time.monotonic()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    injector: Injector | None = None
    broker_fault: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 420
        tick = 0
        while time.monotonic() < deadline and proc.poll() is None and not (
                injector and len(injector.faults) == len(VICTIMS) and broker_fault):
            time.sleep(0.005)
            if injector is None:
                run_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-") and (p / "config.yaml").exists()]
                if run_dirs:
                    injector = Injector(run_dirs[0], started)
                    injector.attach(bootstrap)
                continue
            tick += 1
            injector.read_pairs()
            outstanding = ITEMS - injector.distinct()
            if tick % 20 == 0:
                injector.refresh_pids()
            if not injector.gap_ok():
                continue
            # Each victim only while enough of the run is left for its successor to show it recovered.
            if "assemble" not in injector.faults and outstanding > BATCH and injector.try_assemble():
                continue
            if tick % 20:
                continue
            if any(stage not in injector.faults and outstanding > BATCH and injector.try_stage(stage)
                   for stage in STAGES[:-1]):
                continue
            if "learner" not in injector.faults and outstanding >= 3 * BATCH and injector.try_learner():
                continue
            if not broker_fault and len(injector.faults) >= 3 and outstanding >= 2 * BATCH:
                broker.kill()  # SIGKILL: whatever it had not written to s3 is gone
                broker_fault["down"] = time.monotonic()
                injector.last_fault = broker_fault["down"]
                time.sleep(1.0)
                broker = EmbeddedBroker(broker_cfg, env=env)
                broker.start()  # same port, same bucket
                broker_fault["back"] = time.monotonic()
        # Keep reading pairs until the run ends: the broker's recovery is the next new item after its restart.
        while proc.poll() is None and time.monotonic() < deadline + 240:
            if injector is not None:
                injector.read_pairs()
            time.sleep(0.1)
        assert proc.wait(timeout=10) == 0, "".join(lines)[-2000:] + (tmp_path / "run.stderr").read_text()[-3000:]
        reader.join(10)
        assert injector is not None and set(injector.faults) == set(VICTIMS) and broker_fault, (
            f"faults landed: {sorted(injector.faults) if injector else []}, broker: {bool(broker_fault)}, "
            f"missed: {dict(injector.missed) if injector else {}}; the run ended first; its status lines:\n"
            + "".join(line for line in lines if line.startswith("items"))[-3000:])

        # `sipstream run` stops once every item reached sip.pairs, with the learner's last partial step untrained
        # (by design: re-read after a restart). Restart the learner once more from its checkpoint to drain.
        run_dir = injector.run_dir
        drain_started = time.monotonic()
        with open(run_dir / "logs" / "learner.drain.log", "w") as drain_log:
            drain = subprocess.run(
                [sys.executable, "-m", "sipstream", "learner", "--config", str(run_dir / "config.yaml"),
                 "--bootstrap-servers", bootstrap, "--set", "learner.idle_timeout_s=3"],
                stdout=drain_log, stderr=subprocess.STDOUT, env=env, check=False, timeout=240,
            )
        drain_s = time.monotonic() - drain_started
        assert drain.returncode == 0, (run_dir / "logs" / "learner.drain.log").read_text()[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        specs = T.load_specs()
        prefixes = read_topic(bootstrap, T.PREFIXES, specs[T.PREFIXES].partitions)
        pairs = read_topic(bootstrap, T.PAIRS, specs[T.PAIRS].partitions)
        documents = read_topic(bootstrap, T.DOCUMENTS, specs[T.DOCUMENTS].partitions)
        injector.recoveries()
    finally:
        if injector is not None:
            injector.close()
        if proc.poll() is None:
            proc.kill()
        stderr.close()
        broker.stop()

    # No record lost: every ingested document, every item, one pair per item (after dedupe by item_id).
    items = {r["value"]["item_id"] for r in prefixes}
    pair_ids = Counter(r["value"]["item_id"] for r in pairs)
    assert len({r["value"]["doc_id"] for r in documents}) == DOCUMENTS
    assert len(items) == ITEMS and set(pair_ids) == items
    assert summary["items"] == summary["completed"] == ITEMS and summary["deadlettered"] == 0
    assert all(summary["restarts"][victim] >= 1 for victim in VICTIMS), summary["restarts"]  # by the supervisor
    # The assemble kill left pairs produced and not committed: its successor paired those items again.
    duplicates = sum(pair_ids.values()) - len(pair_ids)
    assert duplicates > 0 and summary["duplicates_removed"] > 0, (duplicates, summary["duplicates_removed"])

    # The learner: every pair record looked at exactly once (duplicates too), no item trained twice, every item
    # trained except ties (no DPO pair by design); duplicates skipped as such.
    by_position = {(r["partition"], r["offset"]): r["value"] for r in pairs}
    log = read_log(run_dir / "smoke" / "consumption.jsonl")
    looked_at = Counter(iter_records(log))
    trained = Counter(by_position[tuple(entry["records"][i])]["item_id"] for entry in log for i in entry["trained"])
    untrainable = {i for i in items if not any(p["value"]["item_id"] == i and p["value"]["chosen"] and p["value"]["rejected"]
                                               for p in pairs)}
    assert set(looked_at) == set(by_position) and max(looked_at.values()) == 1
    assert max(trained.values()) == 1, [i for i, n in trained.items() if n > 1]
    assert set(trained) == items - untrainable
    final_state = json.loads((max((run_dir / "smoke" / "learner").glob("step-*")) / "state.json").read_text())

    # Every fault landed mid-batch and every victim recovered.
    faults = injector.faults
    assert all(f.held > 0 for f in faults.values()) and faults["assemble"].produced_uncommitted > 0
    first_pair_after = next((t for t, _ in injector.distinct_at if t > broker_fault["back"]), None)
    broker_recovery = None if first_pair_after is None else round(first_pair_after - broker_fault["back"], 2)
    recovery = {victim: f.recovery_s for victim, f in faults.items()} | {"broker": broker_recovery}
    assert None not in recovery.values(), recovery
    figures(
        "crash_faults",
        documents_in=DOCUMENTS, items_in=len(items), pairs_out_distinct=len(pair_ids),
        pair_records_on_topic=sum(pair_ids.values()), duplicates_removed=duplicates,
        duplicates_removed_by_run=summary["duplicates_removed"],
        learner_records_looked_at=sum(looked_at.values()), learner_trained=sum(trained.values()),
        learner_skipped_duplicate=final_state["counters"].get("skipped_duplicate", 0),
        learner_skipped_tie=len(untrainable),
        faults={v: {k: x for k, x in asdict(f).items() if k not in ("victim", "wall") and (x or k != "produced_uncommitted")}
                for v, f in faults.items()} | {"broker": {"at_s": round(broker_fault["down"] - started, 1)}},
        missed_windows=dict(injector.missed), recovery_s=recovery,
        restarts={k: v for k, v in summary["restarts"].items() if v},
        broker_down_s=round(broker_fault["back"] - broker_fault["down"], 2), run_s=round(summary["seconds"], 1),
        drain_s=round(drain_s, 1),
    )
