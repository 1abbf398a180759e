"""How `sipstream run` stops: an interrupted run leaves a replayable record, children stop in parallel,
the learner gets the time its orderly stop needs, and the pairs a run judges are trained (issue 18,
defects 2, 7 and 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from sipstream.bus import topics as T
from sipstream.bus.runner import StageRunner
from sipstream.config import project_root
from sipstream.ops.local import Child, stop_children
from sipstream.ops.worker import stop_on_signals
from sipstream.stages.echo import EchoStage

SMOKE = str(project_root() / "configs" / "smoke.yaml")
CHILDREN = {"split", "rewrite", "rollout", "judge", "assemble", "learner"}


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_mid_run_leaves_a_record_that_replay_accepts(tmp_path: Path) -> None:
    env = {**os.environ, "SIPSTREAM_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "run", "--config", SMOKE, "--max-documents", "64",
         "--set", f"run_dir={tmp_path}", "--set", "local.threads_per_process=2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        published = False
        while time.monotonic() < deadline and proc.poll() is None and not published:
            logs = [p / "logs" / "learner.log" for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
            published = bool(logs) and logs[0].exists() and '"weights published"' in logs[0].read_text()
            time.sleep(0.2)
        assert published and proc.poll() is None, "the run ended before the learner published: " + "".join(lines)[-2000:]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stop_seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    out = "".join(lines)
    print(f"SIGTERM mid-run: exit {proc.returncode} after {stop_seconds:.1f}s")
    # 130: the documented exit code of an interrupted run (Ctrl-C or SIGTERM), its record written.
    assert proc.returncode == 130, out[-3000:]
    run_dir = _run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    # Children stop in parallel (the longest of them, not the sum); an interrupted worker finishes its batch only
    # within its grace (3 s, INTERRUPT_GRACE_S), then leaves it uncommitted, and exits without the interpreter's
    # slow garbage collection of torch (gc.freeze); the learner keeps its orderly stop. Then the record:
    # manifest.json, and every partition of every topic exported at once. Measured on 2 cores. Before: 28.0 and
    # 32.2 s at load average 5-7 (children 11.4 and 16.4 s, the judge finishing its batch; record 14.7 and
    # 13.8 s, topic by topic); 83.8 s at load 14 (the judge killed at its 60 s stop timeout; record 19.1 s).
    # Now: 6.6, 7.3 and 7.5 s with nothing else running (children 1.9-2.5 s, the learner last; record 2.7-2.9
    # s: manifest 1.7, archive 1.1); 11.7 s beside four busy processes (load ~5-9: children 6.4 s, the learner;
    # record 3.1 s). The bound leaves room for a loaded CI machine (the learner's own exit is the slowest part).
    print(f"stop: {summary['stop_seconds']}; each child: {summary['child_stop_seconds']}")
    assert stop_seconds <= 15 and summary["stop_seconds"]["record"] <= 6, (stop_seconds, summary["stop_seconds"])
    assert summary["stopped_by"] == "interrupt" and summary["exit_codes"] == dict.fromkeys(CHILDREN, 0), summary
    assert 0 < summary["completed"] < summary["items"] or summary["ingested"] < 64, summary
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["archive"] == "export"
    archived = json.loads((run_dir / "export" / "export.json").read_text())["topics"]
    assert set(archived) == set(manifest["topics"]) and archived["sip.pairs"]["records"] > 0
    # Every partition read at once, and still every record of the recorded ranges.
    assert {t: e["records"] for t, e in archived.items()} == {t: e["records"] for t, e in manifest["topics"].items()}
    # The learner's orderly stop ran to its end: final checkpoint after its last publication, then "stopped".
    learner = [e.get("event") for e in _events(run_dir / "logs" / "learner.log")]
    assert learner[-1] == "learner stopped" and "checkpoint written" in learner[learner.index("weights published"):]

    replay = subprocess.run([sys.executable, "-m", "sipstream", "replay", "learner", "--run", str(run_dir)],
                            capture_output=True, text=True, timeout=600, env=env, check=False)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-3000:]


def _slow_to_stop(seconds: float) -> list[str]:
    """A child that takes `seconds` to finish after SIGTERM, as a learner writing its final checkpoint."""
    code = (f"import signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *_: (time.sleep({seconds}), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "while True: time.sleep(0.1)\n")
    return [sys.executable, "-c", code]


def _started(children: list[Child]) -> None:
    for child in children:
        child.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(child.tail(1) == "ready" for child in children):
        time.sleep(0.05)


def test_children_stop_in_parallel_each_within_its_own_timeout(tmp_path: Path) -> None:
    """The stop that killed the learner in default runs: one child at a time, 60 s each. Now every child gets
    SIGTERM at once; the learner's own (longer) timeout covers its final publish and checkpoint."""
    children = [Child(f"worker-{k}", _slow_to_stop(2.0), tmp_path) for k in range(3)]
    children += [Child("stuck", _slow_to_stop(60.0), tmp_path), Child("learner", _slow_to_stop(4.0), tmp_path)]
    _started(children)
    started = time.monotonic()
    outcome = stop_children(children, {"learner": 8.0}, default_timeout_s=3.0)
    seconds = time.monotonic() - started
    print(f"5 children stopped in {seconds:.1f}s: {outcome}")
    assert outcome.exit_codes == {"worker-0": 0, "worker-1": 0, "worker-2": 0, "stuck": -9, "learner": 0}
    assert outcome.killed == {"stuck": "past its 3s stop timeout"}  # and said so: a -9 in the summary names its cause
    assert seconds < 6.5  # in parallel: the learner's 4 s, not the sum (3 × 2 + 3 + 4)


def _stops_on_second_sigterm() -> list[str]:
    """A worker with a slow batch in hand: the first SIGTERM is noted, the second makes it leave (exit 0)."""
    code = ("import signal, sys, time\nseen = []\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0) if seen else seen.append(1))\n"
            "print('ready', flush=True)\nwhile True: time.sleep(0.1)\n")
    return [sys.executable, "-c", code]


def _exits_3_on_second_sigterm(seconds: float) -> list[str]:
    """A learner writing its final checkpoint for `seconds`; a second SIGTERM would make it exit 3."""
    code = ("import os, signal, sys, time\nseen = []\n"
            "def stop(*_):\n    if seen: os._exit(3)\n"
            f"    seen.append(1)\n    time.sleep({seconds})\n    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\nwhile True: time.sleep(0.1)\n")
    return [sys.executable, "-c", code]


def test_an_interrupted_worker_past_its_grace_is_told_again_the_learner_is_not(tmp_path: Path) -> None:
    children = [Child("judge", _stops_on_second_sigterm(), tmp_path), Child("learner", _exits_3_on_second_sigterm(3.0), tmp_path)]
    _started(children)
    outcome = stop_children(children, {"learner": 30.0}, default_timeout_s=30.0, grace={"judge": 1.0})
    print(f"stopped: {outcome}")
    assert outcome.exit_codes == {"judge": 0, "learner": 0} and not outcome.killed
    assert 1.0 <= outcome.seconds["judge"] < 5 and outcome.seconds["learner"] >= 3.0, outcome.seconds


def test_a_second_interrupt_kills_what_is_left_at_once(tmp_path: Path) -> None:
    children = [Child("learner", _slow_to_stop(60.0), tmp_path)]
    _started(children)
    hurry = threading.Event()
    threading.Timer(1.0, hurry.set).start()
    started = time.monotonic()
    outcome = stop_children(children, {"learner": 60.0}, default_timeout_s=60.0, hurry=hurry)
    assert outcome.exit_codes == {"learner": -9} and time.monotonic() - started < 5


def test_children_outlive_the_thread_that_started_them(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG fires when the *thread* that spawned a child exits, not the process: children of
    `sipstream run` arm it (ops/lifeline.py), so a child started from a helper thread must not die with it."""
    code = ("import sys, time\nfrom sipstream.ops.lifeline import die_with_supervisor\n"
            "assert die_with_supervisor()\nprint('ready', flush=True)\ntime.sleep(60)\n")
    child = Child("learner", [sys.executable, "-c", code], tmp_path,
                  env={**os.environ, "SIPSTREAM_SUPERVISOR_PID": str(os.getpid())})

    def start_and_wait_until_armed() -> None:  # the thread exits only once the child asked for the signal
        child.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.tail(1) != "ready":
            time.sleep(0.05)

    spawner = threading.Thread(target=start_and_wait_until_armed)
    spawner.start()
    spawner.join()
    time.sleep(1.0)
    assert child.crashed() is None, f"the child died with its spawning thread: {child.tail()}"
    assert stop_children([child], {}, default_timeout_s=10.0).exit_codes == {"learner": -signal.SIGTERM}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_trains_what_it_judges_and_accounts_every_drop(tmp_path: Path) -> None:
    """With `local.max_items_in_flight` at its default the rollouts stay within the learner's lag bound.
    The strict bound (max_policy_lag=1) makes the old behaviour drop most pairs as stale on the tiny models."""
    result = subprocess.run(
        [sys.executable, "-m", "sipstream", "run", "--config", SMOKE, "--max-documents", "40",
         "--set", f"run_dir={tmp_path}", "--set", "learner.max_policy_lag=1"],
        capture_output=True, text=True, timeout=800, check=False, env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((_run_dir(tmp_path) / "summary.json").read_text())
    pairs = summary["pairs"]
    print(f"pairs: {pairs}; {summary['seconds']:.0f}s")
    assert pairs["judged"] == summary["completed"] == summary["items"] == 80
    assert pairs["trained"] >= 0.95 * pairs["judged"], pairs
    # Every judged pair is trained or dropped for a named reason.
    assert pairs["trained"] + sum(n for reason, n in pairs["dropped"].items() if reason != "duplicate") == pairs["judged"]
    assert "pairs judged 80, trained" in result.stdout


class _SlowEcho(EchoStage):
    """Echo at 0.5 s an item, as a model stage with a batch in hand: it says when the batch started."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.5)
        self.started = threading.Event()
        self.calls = 0

    def process(self, item):
        self.started.set()
        self.calls += 1
        return super().process(item)


def _handed_again(bus, expected: int) -> int:
    """How many records the stage's group is handed now (nothing committed: all of them again)."""
    deadline = time.monotonic() + 60
    again = StageRunner(EchoStage(), bus.cfg, bus.bootstrap).run(
        until=lambda s: s.counters["consumed"] >= expected or time.monotonic() > deadline)
    return again.counters["processed"]


def test_abandon_leaves_the_batch_in_hand_uncommitted(bus, docs) -> None:
    """A stop past its grace: the stage's thread leaves the batch within one item, commits nothing, and the
    group's next consumer is handed the batch again (at-least-once: nothing is lost)."""
    bus.produce(T.DOCUMENTS, docs(8))
    stage = _SlowEcho()
    runner = StageRunner(stage, bus.cfg, bus.bootstrap)
    stats = Counter()
    loop = threading.Thread(target=lambda: stats.update(runner.run().counters))
    loop.start()
    assert stage.started.wait(60)
    runner.stop()
    runner.abandon()  # from another thread, as `sipstream worker rewrite+judge` does for its stage threads
    asked = time.monotonic()
    loop.join(30)
    left_after = time.monotonic() - asked
    assert not loop.is_alive() and left_after < 3, left_after  # one 0.5 s item, not the rest of the batch
    assert stats["abandoned_batches"] == 1 and stats["processed"] == 0 and stats["consumed"] > 0, stats
    assert _handed_again(bus, 8) == 8


def test_the_same_signal_twice_abandons_the_batch(bus, docs) -> None:
    """`sipstream worker`: SIGINT (Ctrl-C in the terminal) and SIGTERM (the supervisor's stop) together are one
    stop, so the batch goes on; SIGTERM again (the supervisor, past the worker's grace) leaves it uncommitted."""
    bus.produce(T.DOCUMENTS, docs(8))
    stage = _SlowEcho()
    runner = StageRunner(stage, bus.cfg, bus.bootstrap)

    def signals() -> None:
        stage.started.wait(60)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_on_signals(runner.stop, runner.abandon)
        threading.Thread(target=signals, daemon=True).start()
        stats = runner.run().counters  # on this (the main) thread, where the handlers run, as in a worker
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert stats["abandoned_batches"] == 1 and stats["processed"] == 0, stats
    assert 2 <= stage.calls < 8, stage.calls  # it went on after the first two signals, and left at the third
    assert _handed_again(bus, 8) == 8
