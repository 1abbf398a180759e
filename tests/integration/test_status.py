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

from sipstream.bus import topics as T
from sipstream.bus.broker import free_port
from sipstream.bus.runner import StageRunner
from sipstream.config import merged
from sipstream.metrics import documented_names
from sipstream.stages.echo import EchoStage

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
    from sipstream.status import StatusWatcher, render

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
    candidate = lambda text, total: {"kind": "rollout", "index": 0, "text": text, "total": total}
    return {"item_id": f"p{i}:1", "doc_id": f"p{i}", "prefix": f"Chapter {i}. In the morning", "suffix": good, "seed": i,
            "policy_version": 0, "chosen": candidate(good, 2.0), "rejected": candidate(bad, 0.5),
            "target": candidate(good, 2.0)}


def test_the_learner_serves_documented_metrics_and_status_shows_its_loss(bus, tmp_path) -> None:
    from sipstream.learner.config import LearnerConfig
    from sipstream.learner.loop import run_learner
    from sipstream.status import StatusWatcher

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

    from sipstream.status import run_status

    console = Console(record=True, width=140)
    snap = run_status(bus.cfg, bus.bootstrap, once=True, interval_s=0.2, console=console)
    text = console.export_text()
    assert "sipstream status" in text and bus.topic(T.DOCUMENTS) in text and snap.deadletters == 0
