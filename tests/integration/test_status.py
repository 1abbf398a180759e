"""Observability against the real embedded broker: `sipstream status` of a running stage, the /metrics
endpoint of a worker process and of the learner, and the JSON log event of a processed record."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sipstream.bus import topics as T
from sipstream.bus.broker import free_port
from sipstream.bus.runner import StageRunner
from sipstream.config import merged
from sipstream.stages.echo import EchoStage
from sipstream.telemetry.metrics import documented_names

ROOT = Path(__file__).resolve().parents[2]


class VersionedEcho(EchoStage):
    """Echo holding a policy version, as a rollout worker does: its metrics carry `stage.policy_version`."""

    policy_version = 2

    def stage_counters(self) -> dict[str, float]:
        return {"policy_version": self.policy_version}


def _announcement(run_name: str, version: int, age_s: float) -> dict:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    return {"run_name": run_name, "version": version, "uri": f"file:///w/v{version}.safetensors", "sha256": "0" * 64,
            "step": version, "created_at": created.isoformat()}


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read().decode()


def _served_names(text: str) -> set[str]:
    """Metric names announced by `# TYPE` lines (histograms and counters as exposed: *_seconds, *_total)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def _sample(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _wait(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_status_of_a_running_stage_shows_rates_exact_lag_dead_letters_and_policy_age(bus, docs) -> None:
    from sipstream.ops.status import StatusWatcher, render

    cfg = bus.cfg
    bus.produce(T.WEIGHTS, [_announcement(cfg.run_name, 1, 90.0), _announcement(cfg.run_name, 2, 30.0),
                            _announcement("another-run", 7, 5.0)], key=cfg.run_name)
    bus.produce(T.DOCUMENTS, docs(30, "a"))
    runner = StageRunner(VersionedEcho(instance="w1"), cfg, bus.bootstrap, instance_id="echo-w1")
    worker = threading.Thread(target=runner.run, daemon=True)
    worker.start()
    watcher = StatusWatcher(cfg, bus.bootstrap)
    try:
        watcher.poll()
        # While the stage runs, more documents arrive (and one that is not JSON).
        bus.produce(T.DOCUMENTS, [*docs(30, "b"), b"{not json"])
        _wait(lambda: runner.stats.counters["consumed"] >= 61, what="the echo stage to consume 61 records")
        time.sleep(0.5)
        watcher.poll()
        running = watcher.snapshot()
        rates = {t.topic: t.records_per_s for t in running.topics}
        assert rates[bus.topic(T.DOCUMENTS)] > 0 and rates[bus.topic(T.ECHO)] > 0

        runner.stop()
        worker.join(30)
        committed = runner.stats.counters["consumed"]  # M: everything consumed is committed by a clean stop
        assert committed == 61
        bus.produce(T.DOCUMENTS, docs(7, "c"))  # N = 68

        def read_to_the_end() -> bool:
            watcher.poll()
            return sum(t.records for t in watcher.snapshot().topics if t.topic == bus.topic(T.DOCUMENTS)) == 68

        _wait(read_to_the_end, timeout=10, what="the status to read the 7 new documents")
        snap = watcher.snapshot()
    finally:
        watcher.close()
        runner.stop()

    lag = {row.stage: row for row in snap.lag}
    assert (lag["echo"].end, lag["echo"].committed, lag["echo"].lag) == (68, 61, 68 - 61)
    assert (lag["split"].committed, lag["split"].lag) == (None, 68)  # a stage that never ran: everything waits
    assert lag["learner"].topic == bus.topic(T.PAIRS) and lag["learner"].lag == 0
    assert snap.deadletters == 1 and snap.deadletters_by == {"echo/bad_json": 1}
    assert "not JSON" in snap.latest_deadletters[0]["reason"] and snap.latest_deadletters[0]["topic"] == bus.topic(T.DOCUMENTS)
    assert snap.latest_policy_version == 2  # another run's v7 is not ours
    [echo] = [w for w in snap.workers if w.instance == "echo-w1"]
    assert echo.consumed == 61 and echo.deadlettered == 1 and echo.policy_version == 2
    assert 29 <= echo.policy_age_s < 120

    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(render(snap, stale_after_s=60))
    text = console.export_text()
    assert "consumer lag" in text and "echo-w1" in text and "bad_json" in text and "v2" in text
    assert json.loads(json.dumps(snap.as_dict()))["lag"]  # --json output is plain JSON


def _judged(i: int) -> dict:
    scores = [{"kind": "original", "index": 0, "quality": 0.9, "safety": 1.0, "factuality": 1.0, "total": 2.9},
              {"kind": "rollout", "index": 0, "quality": 0.1, "safety": 1.0, "factuality": 0.5, "total": 1.6}]
    return {"item_id": f"j{i}:1", "doc_id": f"j{i}", "chunk_index": 1, "prefix": "Once upon a time", "suffix": " there was",
            "seed": i, "rewrite": None, "why": ["kept"], "rollouts": ["a cat"], "policy_version": 3, "scores": scores}


def test_a_worker_process_serves_documented_metrics_and_logs_json_per_record(bus) -> None:
    port = free_port()
    bus.produce(T.JUDGED, [_judged(i) for i in range(5)])
    cmd = [sys.executable, "-m", "sipstream", "worker", "assemble", "--bootstrap-servers", bus.bootstrap,
           "--set", f"bus.topic_prefix={bus.cfg.bus.topic_prefix}", "--set", f"bus.group_prefix={bus.cfg.bus.group_prefix}",
           "--set", "runner.batch_timeout_s=0.2", "--set", f"runner.health_port={port}", "--set", "logging.level=debug"]
    # stderr is a pipe, not a terminal: the worker must log JSON lines, as under `sipstream run`.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "SIPSTREAM_HOME": "/nonexistent"})
    try:
        def produced() -> bool:
            try:
                return (_sample(_get(port, "/metrics"), "sipstream_records_produced_total") or 0) >= 5
            except OSError:
                return False

        _wait(produced, what="the assemble worker to produce 5 pairs")
        text = _get(port, "/metrics")
        assert _get(port, "/livez").startswith("last beat")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-2000:]

    assert _served_names(text) == documented_names("worker")
    labels = {"run": bus.cfg.run_name, "stage": "assemble"}
    assert _sample(text, "sipstream_records_consumed_total", topic=bus.topic(T.JUDGED), **labels) == 5
    assert _sample(text, "sipstream_records_produced_total", topic=bus.topic(T.PAIRS), **labels) == 5
    assert _sample(text, "sipstream_batch_duration_seconds_count", **labels) >= 1

    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert events and len(events) == len([line for line in output.splitlines() if line.strip()])  # every line is JSON
    processed = [e for e in events if e["event"] == "record processed"]
    assert sorted(e["item_id"] for e in processed) == [f"j{i}:1" for i in range(5)]
    first = processed[0]
    assert first["stage"] == "assemble" and first["policy_version"] == 3 and first["topic"] == bus.topic(T.JUDGED)
    assert isinstance(first["partition"], int) and isinstance(first["offset"], int)


def _pair(i: int) -> dict:
    good, bad = f" the river ran quietly past house {i}.", " zebra zebra zebra!!"
    def candidate(text, total):
        return {"kind": "rollout", "index": 0, "text": text, "total": total}
    return {"item_id": f"p{i}:1", "doc_id": f"p{i}", "prefix": f"Chapter {i}. In the morning", "suffix": good, "seed": i,
            "policy_version": 0, "chosen": candidate(good, 2.0), "rejected": candidate(bad, 0.5),
            "target": candidate(good, 2.0)}


def test_the_learner_serves_documented_metrics_and_status_shows_its_loss(bus, tmp_path) -> None:
    from sipstream.config.learner import LearnerConfig
    from sipstream.learner.loop import run_learner
    from sipstream.ops.status import StatusWatcher

    port = free_port()
    cfg = merged(bus.cfg, run_dir=str(tmp_path / "runs"),
                 runner={"health_port": port, "metrics_interval_s": 0.1},
                 models={"policy": {"source": "tiny-gpt2", "device": "cpu", "max_prompt_tokens": 64}})
    lcfg = LearnerConfig(algo="dpo", device="cpu", batch_pairs=2, sync_every=1, max_steps=3, poll_timeout_s=0.2,
                         weight_store=(tmp_path / "store").as_uri(), checkpoint_dir=tmp_path / "ckpt")
    bus.produce(T.PAIRS, [_pair(i) for i in range(4)], key="k")  # two steps; the third waits for more pairs
    learner = threading.Thread(target=run_learner, args=(cfg, bus.bootstrap), daemon=True,
                               kwargs={"learner": lcfg, "handle_signals": False})
    learner.start()
    try:
        def two_steps() -> bool:
            try:
                return _sample(_get(port, "/metrics"), "sipstream_learner_steps_total") == 2
            except OSError:
                return False

        _wait(two_steps, timeout=60, what="two learner steps on /metrics")
        text = _get(port, "/metrics")
    finally:
        bus.produce(T.PAIRS, [_pair(i) for i in range(4, 6)], key="k")  # the third step: the learner finishes
        learner.join(60)
    assert not learner.is_alive()

    assert _served_names(text) == documented_names("learner")
    labels = {"run": cfg.run_name, "stage": "learner"}
    assert _sample(text, "sipstream_policy_version", **labels) == 2
    assert _sample(text, "sipstream_weights_published_total", **labels) == 2
    assert _sample(text, "sipstream_records_consumed_total", topic=bus.topic(T.PAIRS), **labels) == 4
    assert _sample(text, "sipstream_learner_tokens_total", **labels) > 0
    assert _sample(text, "sipstream_learner_loss", **labels) > 0
    assert _sample(text, "sipstream_learner_tokens_per_second", **labels) > 0
    assert _sample(text, "sipstream_learner_reward_margin", **labels) is not None
    assert _sample(text, "sipstream_model_load_seconds", **labels) > 0
    assert _sample(text, "sipstream_weights_publish_duration_seconds_count", **labels) == 2

    watcher = StatusWatcher(cfg, bus.bootstrap)
    try:
        watcher.poll()
        snap = watcher.snapshot()
    finally:
        watcher.close()
    [row] = snap.learner
    assert row.step == 3 and row.policy_version == 3 and row.loss > 0
    assert row.reward_margin is not None and row.tokens_per_s is not None  # 0 once it stopped training
    assert snap.latest_policy_version == 3


def test_status_command_prints_a_json_snapshot(bus, docs) -> None:
    # An unreachable broker is the one-line error of `resolve_bootstrap`, shared with every command and
    # tested in test_cli.py (it waits out a 10 s connection timeout, so it is not repeated here).
    bus.produce(T.DOCUMENTS, docs(3))
    cmd = [sys.executable, "-m", "sipstream", "status", "-b", bus.bootstrap, "--json", "--interval", "0.2",
           "--set", f"bus.topic_prefix={bus.cfg.bus.topic_prefix}", "--set", f"bus.group_prefix={bus.cfg.bus.group_prefix}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "SIPSTREAM_HOME": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert {t["topic"]: t["records"] for t in snap["topics"]}[bus.topic(T.DOCUMENTS)] == 3
    assert {row["stage"]: row["lag"] for row in snap["lag"]}["split"] == 3


def test_status_once_prints_tables(bus) -> None:
    from rich.console import Console

    from sipstream.ops.status import run_status

    console = Console(record=True, width=140)
    snap = run_status(bus.cfg, bus.bootstrap, once=True, interval_s=0.2, console=console)
    text = console.export_text()
    assert "sipstream status" in text and bus.topic(T.DOCUMENTS) in text and snap.deadletters == 0


# --------------------------------------------------------------------------- the whole loop, as a user sees it

# A stage's throughput is the rate of the topic it writes.
STAGE_OUTPUTS = {"split": T.PREFIXES, "rewrite": T.REWRITTEN, "rollout": T.ROLLOUTS, "judge": T.JUDGED,
                 "assemble": T.PAIRS}
MUST_MOVE = ("split", "rollout", "judge", "assemble")


class GroupOffsets:
    """The test's own reading of the bus, apart from sipstream's: end offsets by consuming every record
    (the embedded broker's watermarks are wrong) and each stage group's committed offsets."""

    def __init__(self, bus) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from sipstream.bus.lag import PIPELINE_STAGES, STAGE_INPUTS

        self.bus = bus
        self.inputs = {stage: STAGE_INPUTS[stage] for stage in PIPELINE_STAGES}
        self.partitions = {name: T.load_specs()[name].partitions for name in set(self.inputs.values())}
        self.ends: dict[str, dict[int, int]] = {name: {} for name in self.partitions}
        self.reader = Consumer({"bootstrap.servers": bus.bootstrap, "group.id": "test-end-offsets",
                                "enable.auto.commit": False})
        self.reader.assign([TopicPartition(bus.topic(name), p, 0) for name, n in self.partitions.items() for p in range(n)])
        self.probes = {stage: Consumer({"bootstrap.servers": bus.bootstrap, "group.id": f"{bus.cfg.bus.group_prefix}.{stage}",
                                        "enable.auto.commit": False}) for stage in self.inputs}
        self.names = {bus.topic(name): name for name in self.partitions}

    def end(self, wait_s: float = 0.5, max_s: float = 5.0) -> dict[str, int]:
        """{input topic: sum of end offsets}: read until nothing arrives for `wait_s` (caught up), or for
        `max_s` while the loop keeps producing (by then past every record that existed when it began)."""
        started = time.monotonic()
        while time.monotonic() - started < max_s:
            msgs = [m for m in self.reader.consume(1000, timeout=wait_s) if m.error() is None]
            if not msgs:
                break
            for m in msgs:
                ends = self.ends[self.names[m.topic()]]
                ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
        return {name: sum(ends.values()) for name, ends in self.ends.items()}

    def committed(self) -> dict[str, int]:
        """{stage: sum of its group's committed offsets on its input topic} (0 where never committed)."""
        from confluent_kafka import TopicPartition

        out = {}
        for stage, name in self.inputs.items():
            wanted = [TopicPartition(self.bus.topic(name), p) for p in range(self.partitions[name])]
            out[stage] = sum(max(tp.offset, 0) for tp in self.probes[stage].committed(wanted, timeout=10))
        return out

    def close(self) -> None:
        self.reader.close()
        for probe in self.probes.values():
            probe.close()


def _status_json(bus, config: Path, interval_s: float) -> dict:
    """`sipstream status --json`, as a user runs it next to a running loop."""
    cmd = [sys.executable, "-m", "sipstream", "status", "--config", str(config), "-b", bus.bootstrap, "--json",
           "--interval", str(interval_s), "--set", f"bus.topic_prefix={bus.cfg.bus.topic_prefix}",
           "--set", f"bus.group_prefix={bus.cfg.bus.group_prefix}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "SIPSTREAM_HOME": "/nonexistent"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _check_lag(snap: dict, ends: tuple[dict[str, int], dict[str, int]], committed: tuple[dict[str, int], dict[str, int]],
               inputs: dict[str, str]) -> None:
    """Each pipeline stage's row lies between the test's own readings before and after the status call."""
    rows = {row["stage"]: row for row in snap["lag"]}
    for stage, name in inputs.items():
        row = rows[stage]
        (end_before, end_after), (done_before, done_after) = (e[name] for e in ends), (c[stage] for c in committed)
        done = row["committed"] or 0
        assert end_before <= row["end"] <= end_after, (stage, row, end_before, end_after)
        assert done_before <= done <= done_after, (stage, row, done_before, done_after)
        assert row["lag"] == row["end"] - done, (stage, row)


def _watch(proc: subprocess.Popen, log: Path, bus, config: Path, offsets: GroupOffsets,
           timeout_s: float) -> tuple[set[str], list[dict], int]:
    """Poll status until the stages of MUST_MOVE have shown throughput and a learner row a published policy;
    check every snapshot's lag against readings taken just before and just after it."""
    moving: set[str] = set()
    learner: list[dict] = []
    polls = 0
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert proc.poll() is None, log.read_text()[-3000:]
        end_before, committed_before = offsets.end(wait_s=0.2), offsets.committed()
        snap = _status_json(bus, config, interval_s=1.5)
        _check_lag(snap, (end_before, offsets.end()), (committed_before, offsets.committed()), offsets.inputs)
        polls += 1
        rates = {t["topic"]: t["records_per_s"] for t in snap["topics"]}
        moving |= {stage for stage, name in STAGE_OUTPUTS.items() if (rates[bus.topic(name)] or 0) > 0}
        learner = [row for row in snap["learner"] if (row["policy_version"] or 0) >= 1 and (row["step"] or 0) >= 1]
        print(f"status call {polls} at {time.monotonic() - started:.0f}s: moving {sorted(moving)}, "
              f"learner {[(row['step'], row['policy_version']) for row in snap['learner']]}")
        if set(MUST_MOVE) <= moving and learner and (snap["latest_policy_version"] or 0) >= 1:
            break
    return moving, learner, polls


def _trickle(bus, stop: threading.Event, every_s: float) -> None:
    """Documents keep arriving while the loop runs (as from a live `sipstream ingest`), so the split stage
    moves whenever status looks, not only in the burst of the run's own ingestion."""
    from sipstream.eval.heldout import training_corpus
    from sipstream.ops.ingest import produce_documents

    corpus = list(training_corpus())
    n = 0
    while not stop.wait(every_s):
        doc = corpus[n % len(corpus)]
        produce_documents(bus.cfg.bus, bus.bootstrap, [{**doc, "doc_id": f"{doc['doc_id']}.again{n}"}])
        n += 1


@pytest.mark.slow
def test_status_of_the_running_loop_shows_every_stage_moving_and_each_groups_true_lag(bus, docs, tmp_path) -> None:
    """`sipstream run` on tiny random models against the test's broker; `sipstream status --json` polled from
    outside until the split, rollout, judge and assemble stages have shown throughput and the learner has
    published a policy; lag checked against the groups' committed offsets read here, while running and
    once the run was stopped (then exactly, and every rate is 0)."""
    import signal

    config = ROOT / "configs" / "smoke.yaml"
    # More documents than the test waits for: the run is stopped once status has shown everything (about
    # 40-50 s on a quiet 2-core machine, mostly the workers loading; the generous limit is for a busy one).
    run = [sys.executable, "-m", "sipstream", "run", "--config", str(config), "-b", bus.bootstrap,
           "--max-documents", "40", "--set", f"run_dir={tmp_path}", "--set", f"bus.topic_prefix={bus.cfg.bus.topic_prefix}",
           "--set", f"bus.group_prefix={bus.cfg.bus.group_prefix}"]
    started = time.monotonic()
    offsets = GroupOffsets(bus)
    stop_trickle = threading.Event()
    trickle = threading.Thread(target=_trickle, args=(bus, stop_trickle, 1.0), daemon=True)
    try:
        with open(tmp_path / "run.log", "w") as log:
            proc = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)})
            trickle.start()
            try:
                moving, learner, polls = _watch(proc, tmp_path / "run.log", bus, config, offsets, timeout_s=150)
            finally:
                stop_trickle.set()
                trickle.join(30)
                proc.send_signal(signal.SIGTERM)  # the Ctrl-C stop: workers commit what they finished and leave
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        assert set(MUST_MOVE) <= moving, f"after {polls} status calls only {sorted(moving)} showed throughput"
        assert learner, f"no learner row with a published policy after {polls} status calls"

        # At rest: the loop drains what it can while it stops, so documents that arrive afterwards make sure
        # some lag is left; nothing moves any more, so status must agree exactly and show every rate 0.
        bus.produce(T.DOCUMENTS, docs(3, "late"))
        ends, committed = offsets.end(), offsets.committed()
        snap = _status_json(bus, config, interval_s=0.5)
        assert (offsets.end(), offsets.committed()) == (ends, committed)
    finally:
        offsets.close()
    lag = {row["stage"]: row for row in snap["lag"]}
    for stage, name in offsets.inputs.items():
        assert (lag[stage]["end"], lag[stage]["committed"] or 0, lag[stage]["lag"]) == \
            (ends[name], committed[stage], ends[name] - committed[stage]), stage
    print(f"{polls} status calls, {time.monotonic() - started:.0f}s; lag at rest "
          + ", ".join(f"{s} {row['lag']}" for s, row in lag.items()))
    assert lag["split"]["lag"] >= 3  # the late documents at least
    assert all(t["records_per_s"] == 0 for t in snap["topics"]), snap["topics"]
