"""Memory: peak RSS of every process of the embedded default (`sipstream run`, configs/tiny.yaml).

Runs `sipstream run` on 2 documents (4 items) with the real models, `learner.batch_pairs=2` so the
learner takes optimizer steps before the run ends (memory per step is set by `learner.batch_tokens`,
one DPO pair per pass, not by the pairs per step). Each worker's peak comes from the run's
`summary.json` (the supervisor reads VmHWM of its children before stopping them); the supervisor
itself and the embedded broker are sampled here from /proc every half second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.context import ROOT, TINY, Context
from benchmarks.measure import Section
from sipstream.local import peak_rss_mb

TITLE = "Memory: peak RSS per process of `sipstream run` (embedded default)"


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of a process's direct children."""
    try:
        pids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for child in pids:
        try:
            out.append((int(child), Path(f"/proc/{child}/comm").read_text().strip()))
        except OSError:
            continue
    return out


def run(ctx: Context) -> Section:
    run_dir = ctx.scratch / "runs"
    argv = [sys.executable, "-m", "sipstream", "run", "--config", str(TINY), "--max-documents", "2",
            "--set", "learner.batch_pairs=2", "--set", f"run_dir={run_dir}", "--set", "run_name=bench-memory"]
    section = Section(TITLE, (
        "`sipstream run --config configs/tiny.yaml --max-documents 2 --set learner.batch_pairs=2` (4 items, "
        "2 rollouts each, the learner steps every 2 pairs), its own embedded broker; workers' peaks from the "
        "run's summary.json, supervisor and broker sampled from /proc"))
    log_path = ctx.scratch / "memory-run.log"
    peaks: dict[str, float] = {}
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "SIPSTREAM_HOME": str(ctx.scratch / "home")})
        while proc.poll() is None:
            for name, pid in [("supervisor (sipstream run)", proc.pid)] + [
                    ("broker (tansu)", child) for child, comm in children(proc.pid) if comm.startswith("tansu")]:
                peak = peak_rss_mb(pid)
                if peak is not None:
                    peaks[name] = max(peaks.get(name, 0.0), peak)
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sipstream run exited with {proc.returncode}: {log_path.read_text()[-1500:]}")
    summaries = sorted(run_dir.glob("bench-memory-*/summary.json"))
    if not summaries:
        raise RuntimeError(f"sipstream run wrote no summary.json under {run_dir}")
    summary = json.loads(summaries[-1].read_text())
    workers = summary["peak_rss_mb"]
    for name, mb in {**workers, **peaks}.items():
        section.metric(f"peak_rss_mb_{name.split()[0]}", f"{name} peak RSS", mb, "MB")
    total = sum(workers.values()) + sum(peaks.values())
    section.metric("peak_rss_mb_sum", "sum of the peaks (an upper bound of the run's footprint)", total, "MB")
    section.metric("run_seconds", "run wall time", seconds, "s")
    section.info["items completed"] = summary["completed"]
    section.info["policy versions published"] = len(summary["policy_versions"])
    section.notes.append(
        "The learner holds the policy, a frozen DPO reference, AdamW's two moments and the activations of one "
        "DPO pair (`learner.batch_tokens: 2048`); rewrite and judge each load Gemma-3-270M in float32 (the judge "
        "and rewriter share one copy within a process), rollout loads SmolLM2-135M. Peaks are not simultaneous, "
        "so their sum overstates the machine's footprint.")
    return section
