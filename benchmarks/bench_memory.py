"""Memory: peak RSS of every process of the embedded default (`sipstream run`, configs/tiny.yaml), and of the whole run.

Runs `sipstream run` on 2 documents (4 items) with the real models and the default's process layout
(`local.colocate`: stages that share a process are one worker, named like `rewrite+judge`),
`learner.batch_pairs=2` so the learner takes optimizer steps before the run ends (memory per step is
set by `learner.batch_tokens`, one DPO pair per pass, not by the pairs per step). Each worker's peak
comes from the run's `summary.json` (the supervisor reads VmHWM of its children before stopping them),
as do the whole run's peaks (supervisor, broker and every worker summed every 2 s, PSS and RSS); the
supervisor itself and the embedded broker are sampled here from /proc every half second.
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
from sipstream.ops.local import peak_rss_mb

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


def metric_key(process: str) -> str:
    """`peak_rss_mb_rewrite_judge` for the process `rewrite+judge`, `..._supervisor` for `supervisor (sipstream run)`."""
    return "peak_rss_mb_" + process.split()[0].replace("+", "_").replace("-", "_")


def process_label(process: str) -> str:
    stages = process.split()[0].split("+")
    return f"{process} peak RSS" + (f" ({len(stages)} stages, one process)" if len(stages) > 1 else "")


def run(ctx: Context) -> Section:
    from sipstream.config import load_config
    from sipstream.ops.local import process_groups, thread_env

    run_dir = ctx.scratch / "runs"
    overrides = ["learner.batch_pairs=2", f"run_dir={run_dir}", "run_name=bench-memory"]
    argv = [sys.executable, "-m", "sipstream", "run", "--config", str(TINY), "--max-documents", "2",
            *(arg for override in overrides for arg in ("--set", override))]
    cfg = load_config(TINY, overrides=overrides, env={})
    layout = ", ".join("+".join(group) for group in process_groups(cfg))
    threads = thread_env(cfg).get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "torch's default"))
    section = Section(TITLE, (
        "`sipstream run --config configs/tiny.yaml --max-documents 2 --set learner.batch_pairs=2` (4 items, "
        f"2 rollouts each, the learner steps every 2 pairs), its own embedded broker; worker processes {layout} and "
        f"the learner (OMP_NUM_THREADS={threads} each; learner gradient checkpointing "
        f"{'on' if cfg.learner.gradient_checkpointing else 'off'}, MALLOC_MMAP_THRESHOLD_="
        f"{cfg.local.learner_malloc_mmap_threshold}); workers' peaks and the whole run's from the run's summary.json, "
        "supervisor and broker sampled from /proc"))
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
    expected = {"+".join(group) for group in process_groups(cfg)} | {"learner"}
    if set(workers) != expected:
        raise RuntimeError(f"summary.json lists processes {sorted(workers)}, expected {sorted(expected)}")
    for name, mb in {**workers, **peaks}.items():
        section.metric(metric_key(name), process_label(name), mb, "MB")
    section.metric("peak_total_pss_mb", "whole run, peak of the summed PSS (what the run takes from the machine)",
                   summary["peak_total_pss_mb"], "MB")
    section.metric("peak_total_rss_mb", "whole run, peak of the summed RSS (shared pages counted in every process)",
                   summary["peak_total_rss_mb"], "MB")
    total = sum(workers.values()) + sum(peaks.values())
    section.metric("peak_rss_mb_sum", "sum of the per-process peaks (not simultaneous: an upper bound)", total, "MB")
    section.metric("run_seconds", "run wall time", seconds, "s")
    if summary.get("first_update_s"):
        section.metric("first_update_s", "first policy update after", summary["first_update_s"], "s")
    section.info["items completed"] = summary["completed"]
    section.info["policy versions published"] = len(summary["policy_versions"])
    shared = [group for group in process_groups(cfg) if len(group) > 1]
    section.notes.append(
        "The learner holds the policy, a frozen DPO reference, AdamW's two moments and the activations of one "
        f"DPO pair (`learner.batch_tokens: {cfg.learner.batch_tokens}`, gradient checkpointing "
        f"{'on' if cfg.learner.gradient_checkpointing else 'off'}). Colocated stages "
        f"({', '.join('+'.join(g) for g in shared) or 'none'}) run as one process with a thread per stage: rewrite "
        "and judge load Gemma-3-270M once between them, split rides with rollout (SmolLM2-135M). The whole-run PSS "
        "is the figure to compare with a machine's memory (shared library pages counted once); per-process peaks "
        "are not simultaneous, so their sum overstates the footprint.")
    return section
