"""`sipstream run` end to end: embedded broker, topics, one worker process per stage, the shipped corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sipstream.config import project_root

STAGES = {"split", "rewrite", "rollout", "judge", "assemble"}
CHILDREN = STAGES | {"learner"}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the run plus three replays; minutes each when other work shares the cores
def test_sipstream_run_moves_the_corpus_through_every_stage(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--set", f"run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ingested 6 documents; stages: split → rewrite → rollout → judge → assemble" in result.stdout
    summary_line = next(line for line in result.stdout.splitlines() if line.startswith("done:"))
    # 6 documents, at most 2 items each (smoke.yaml); every item reaches sip.pairs, none dead-lettered.
    assert "6 documents → 12 items; 12 reached sip.pairs, 0 dead-lettered" in summary_line

    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_codes"] == dict.fromkeys(CHILDREN, 0) and summary["restarts"] == dict.fromkeys(CHILDREN, 0)
    assert sum(summary["chosen_by_kind"].values()) == 12
    # Every original was judged once; the share flagged unsafe is reported (tiny random judge: any share).
    flags = summary["judge_flags"]
    assert flags["originals_judged"] == 12 and 0 <= flags["originals_flagged_unsafe"] <= 12
    assert flags["share_flagged"] == round(flags["originals_flagged_unsafe"] / 12, 4)
    # The learner trained on the pairs and published policy updates (12 pairs, 4 per step in smoke.yaml).
    assert summary["policy_versions"] and summary["policy_versions"] == sorted(summary["policy_versions"])
    weights = list((run_dir / "smoke" / "weights").rglob("*.safetensors"))
    assert len(weights) == len(summary["policy_versions"])
    for stage in STAGES:  # each worker logged to its own file and stopped gracefully
        events = [json.loads(line) for line in (run_dir / "logs" / f"{stage}.log").read_text().splitlines()
                  if line.startswith("{")]
        assert any(e.get("event") == "stage stopped" for e in events), stage
    assert (run_dir / "config.yaml").exists()

    # The run archived what `sipstream report` draws from, and the report renders from a real run.
    from sipstream.report import write_report

    html = write_report(run_dir).read_text()
    for png in ("reward.png", "curriculum.png", "learner.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000 and f'src="{png}"' in html

    # The run's manifest: who produced and consumed each topic, the model files' sha256, and, since the
    # in-memory broker ended with the run, where every topic was archived.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "pipeline" and manifest["bus"]["ephemeral"] and manifest["archive"] == "export"
    rollouts = manifest["topics"]["sip.rollouts"]
    assert (rollouts["produced_by"], rollouts["consumed_by"], rollouts["records"]) == (["rollout"], ["judge"], 12)
    assert manifest["topics"]["sip.weights"]["consumed_by"] == ["rollout"]
    assert manifest["topics"]["sip.documents"]["produced_by"] == ["ingest"]
    judge, rewriter = manifest["models"]["judge"], manifest["models"]["rewriter"]
    assert len(judge["sha256"]) == 64 and judge["sha256"] == rewriter["sha256"]  # the same tiny-gpt2 files
    archived = json.loads((run_dir / "export" / "export.json").read_text())["topics"]
    assert set(archived) == set(manifest["topics"]) and archived["sip.rollouts"]["records"] == 12

    # The broker is gone; replay works from the archive, on a broker of its own.
    def replay(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "sipstream", "replay", *args, "--run", str(run_dir)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    out = replay("stage", "judge", "--set", "judge.weights.factuality=1")
    assert "stage judge: 12 records in → 12 out, 0 dead-lettered" in out and "archived in" in out
    # Bit-identical although this process may have other OpenMP settings: the replay uses the learner's
    # recorded thread count (CPU float sums depend on it).
    assert manifest["threads"]["learner"] >= 1
    assert "identical to the original run" in replay("learner")
    out = replay("learner", "--algo", "pretrain")
    assert "(pretrain)" in out and "original (dpo)" in out


# Kill tests run the children with torch's own thread count (2 here) rather than `sipstream run`'s
# one-thread share: with one thread each the tiny run can finish inside the supervisor's first (~15 s)
# status read, and the test never sees the run in flight to kill a worker ("killed []").
KILL_WINDOW_THREADS = "local.threads_per_process=2"


def _pids_of(needle: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_a_crashed_worker_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--set", f"run_dir={tmp_path}", "--set", KILL_WINDOW_THREADS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    deadline = time.monotonic() + 120
    killed = []
    while time.monotonic() < deadline and not killed:
        run_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
        rollouts = _pids_of(f"{run_dirs[0]}/config.yaml") if run_dirs else []
        rollouts = [pid for pid in rollouts if pid in _pids_of("worker rollout")]
        if rollouts:
            time.sleep(3.0)  # let it load its model and start consuming
            os.kill(rollouts[0], signal.SIGKILL)
            killed.append(rollouts[0])
        time.sleep(0.5)
    out, err = proc.communicate(timeout=900)
    assert killed, "never found the rollout worker to kill"
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"]["rollout"] == 1
    assert summary["items"] == 12 and summary["completed"] == 12 and summary["deadlettered"] == 0


@pytest.mark.slow
def test_two_workers_per_stage_one_of_each_killed_every_item_reaches_pairs_once(tmp_path: Path) -> None:
    """The scale-out check of the deploy issue, on the embedded broker: each stage runs 2 workers in one
    group, one worker of every stage is killed with SIGKILL mid-run, the supervisor restarts it, and every
    item still reaches sip.pairs exactly once after dedupe by item_id."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--workers", "2", "--max-documents", "16", "--set", f"run_dir={tmp_path}", "--set", KILL_WINDOW_THREADS],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.log", "w"), text=True,
        env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    import re
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    killed: dict[str, int] = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(killed) < len(STAGES) and proc.poll() is None:
        run_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
        # Mid-run: items exist and some, not all, have reached sip.pairs.
        status = [re.search(r"items (\d+) \|.*assemble (\d+) ", line) for line in lines[-3:]]
        progress = [(int(m.group(1)), int(m.group(2))) for m in status if m]
        if run_dirs and progress and 0 < progress[-1][1] < progress[-1][0]:
            mine = set(_pids_of(f"{run_dirs[0]}/config.yaml"))
            for stage in STAGES - set(killed):
                pids = [pid for pid in _pids_of(f"--instance-id {stage}-0-local") if pid in mine]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed[stage] = pids[0]
        time.sleep(0.5)
    proc.wait(timeout=900)
    reader.join(10)
    out, err = "".join(lines), (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"killed {sorted(killed)}; restarts {summary['restarts']}; duplicates removed {summary['duplicates_removed']}")
    assert set(killed) == STAGES, f"could not kill a worker of {STAGES - set(killed)} mid-run"
    assert all(summary["restarts"][f"{stage}-0"] == 1 for stage in STAGES)
    # Exactly once after dedupe: every item (distinct item_id on sip.prefixes) has one pair.
    assert summary["items"] == 32 and summary["completed"] == 32 and summary["deadlettered"] == 0
    assert summary["policy_versions"]


@pytest.mark.slow
def test_max_items_bounds_a_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--max-documents", "50", "--max-items", "4", "--max-steps", "1", "--set", f"run_dir={tmp_path}",
         # Every document at the start (the bound on items in flight would hold most of them back).
         "--set", "local.max_items_in_flight=unbounded"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ingested"] == 50
    # Stopped early: 50 documents hold 100 items, which at 8 per batch need 13 batches through every stage;
    # the supervisor checks about once a second (a 20-document run once finished between two checks).
    assert 4 <= summary["completed"] < 100, summary
    assert summary["policy_versions"] == [1]  # --max-steps 1: one optimizer step, one publication
    assert all(code == 0 for code in summary["exit_codes"].values())


@pytest.mark.slow
def test_colocated_stages_run_as_threads_of_one_process(tmp_path: Path) -> None:
    # The laptop default's layout (configs/tiny.yaml) on the tiny models: rewrite and judge share one
    # process and its judge model, split rides with rollout.
    result = subprocess.run(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--set", f"run_dir={tmp_path}", "--set", "local.colocate=[[rewrite, judge], [split, rollout]]"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    children = {"split+rollout", "rewrite+judge", "assemble", "learner"}
    assert summary["exit_codes"] == dict.fromkeys(children, 0)
    assert summary["completed"] == summary["items"] == 12 and summary["deadlettered"] == 0
    assert summary["peak_total_pss_mb"] > 0 and summary["first_update_s"] is not None
    for group in ("split+rollout", "rewrite+judge"):  # each stage of a group ran and stopped gracefully
        events = [json.loads(line) for line in (run_dir / "logs" / f"{group}.log").read_text().splitlines()
                  if line.startswith("{")]
        assert {e.get("stage") for e in events if e.get("event") == "stage stopped"} == set(group.split("+"))


def _wait_for(predicate, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_child_outlives_sipstream_run(tmp_path: Path, how: str) -> None:
    """SIGTERM (`kill`, `timeout`, `docker stop`) stops a run like Ctrl-C: workers, learner and broker
    all exit. SIGKILL of the supervisor takes its workers and learner with it (parent-death signal)."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--max-documents", "40", "--set", f"run_dir={tmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)},
    )
    try:
        def children() -> list[int]:
            run_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
            return _pids_of(f"{run_dirs[0]}/config.yaml") if run_dirs else []

        assert _wait_for(lambda: len(children()) == len(CHILDREN), 120), "the run's children did not start"
        started = children()
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=120)
        assert _wait_for(lambda: not set(started) & set(children()), 60), f"still running after {how}: {children()}"
        if how == "SIGTERM":
            assert proc.returncode == 130  # the Ctrl-C path: children stopped, broker stopped, summary written
            (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
            assert json.loads((run_dir / "summary.json").read_text())["exit_codes"].keys() == CHILDREN
    finally:
        if proc.poll() is None:
            proc.kill()
