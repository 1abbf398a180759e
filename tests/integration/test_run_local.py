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
    assert summary["exit_codes"] == {s: 0 for s in CHILDREN} and summary["restarts"] == {s: 0 for s in CHILDREN}
    assert sum(summary["chosen_by_kind"].values()) == 12
    # The learner trained on the pairs and published policy updates (12 pairs, 4 per step in smoke.yaml).
    assert summary["policy_versions"] and summary["policy_versions"] == sorted(summary["policy_versions"])
    weights = list((run_dir / "smoke" / "weights").rglob("*.safetensors"))
    assert len(weights) == len(summary["policy_versions"])
    for stage in STAGES:  # each worker logged to its own file and stopped gracefully
        events = [json.loads(line) for line in (run_dir / "logs" / f"{stage}.log").read_text().splitlines()
                  if line.startswith("{")]
        assert any(e.get("event") == "stage stopped" for e in events), stage
    assert (run_dir / "config.yaml").exists()


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
         "--set", f"run_dir={tmp_path}"],
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
