"""The data-parallel learner under torchrun (gloo, 2 CPU ranks) against the real embedded broker.

Equivalence: on the same recorded pairs (one partition: a fixed order), `torchrun --nproc_per_node=2 -m
sipstream.learner` reads the same records into the same steps as one process (the same consumption log),
publishes the same versions at the same steps, and ends with the same weights up to float rounding.
They are not bit-identical: each rank sums its share's gradients, then the all-reduce adds the two sums
(and pads its own micro-batches), so the additions happen in another order than in one process.

Faults: kill -9 of rank 1, or of rank 0, mid-run: torchrun ends (no rank hangs on a collective) and a
restart resumes from the last checkpoint and trains every pair exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sipstream.bus import topics as T
from sipstream.bus.broker import free_port
from sipstream.runs.consumption import LOG_NAME, read_log

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
PAIRS = 21  # 5 full steps of 4 pairs, then a step of 1 pair: rank 1 has no share of it
STEPS = 6
# Largest |single - ddp| over every published weight after 6 AdamW steps at lr 1e-3. Measured 1.6e-6 (DPO)
# and 1.8e-6 (NLL) on 2 CPU cores. The tolerance is 1% of one step's largest move: Adam moves a weight by
# up to ~lr a step, so a pair trained twice, skipped or in another step shifts weights by a good fraction
# of lr = 1e-3. Adam is blind to a gradient's scale, so the loss and the gradient norm (before clipping)
# of the last step are compared too: a loss scaled wrongly over ranks changes them by the factor.
WEIGHT_TOLERANCE = 1e-5
GAUGE_TOLERANCE = 1e-4  # relative; float32 sums in another order


def learner_args(tiny_cfg: Any, group: str, run_name: str, tmp_path: Path, **learner: Any) -> list[str]:
    settings = {
        "bus.topic_prefix": tiny_cfg.bus.topic_prefix, "bus.group_prefix": group, "run_name": run_name,
        "run_dir": str(tmp_path / "runs"), "models.policy.source": "tiny-gpt2",
        "models.policy.cache_dir": str(tiny_cfg.models.policy.cache_dir), "models.policy.device": "cpu",
        "models.policy.max_prompt_tokens": 64, "runner.metrics_interval_s": 1,
        "learner.device": "cpu", "learner.lr": 0.001,
        # 4 pairs a step in 4 micro-batches: one process makes 4 passes, each rank 2 (the first under no_sync).
        "learner.batch_pairs": 1, "learner.grad_accum": 4,
        "learner.max_steps": STEPS, "learner.idle_timeout_s": 2, "learner.sync_every": 2,
        "learner.checkpoint_every": 2, "learner.max_policy_lag": 100, "learner.poll_timeout_s": 0.2,
        "learner.dist_timeout_s": 30,
        **{f"learner.{k}": v for k, v in learner.items()},
    }
    return ["--bootstrap", tiny_cfg.bus.bootstrap_servers, f"--instance-id={run_name}",
            *(f"--set={k}={v}" for k, v in settings.items())]


def launch(command: list[str], log: Path) -> subprocess.Popen:
    # One torch thread per process: two ranks share these cores, and the single run matches them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": ""}
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # a stuck test can end the whole tree


def start_single(tiny_cfg: Any, run_name: str, tmp_path: Path, **learner: Any) -> subprocess.Popen:
    return launch([sys.executable, "-m", "sipstream.learner", *learner_args(tiny_cfg, run_name, run_name, tmp_path,
                                                                            **learner)], tmp_path / f"{run_name}.log")


def start_ddp(tiny_cfg: Any, run_name: str, tmp_path: Path, **learner: Any) -> subprocess.Popen:
    rendezvous = ["--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    return launch([*TORCHRUN, *rendezvous, "-m", "sipstream.learner", *learner_args(tiny_cfg, run_name, run_name,
                                                                                     tmp_path, **learner)],
                  tmp_path / f"{run_name}.log")


def finish(process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Wait for a learner run; its wall time. A run past `timeout` is killed (whole tree) and fails the test."""
    started = time.monotonic()
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout:.0f}s: {log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]
    return time.monotonic() - started


def consumption(tmp_path: Path, run_name: str) -> list[dict]:
    return read_log(tmp_path / "runs" / run_name / LOG_NAME)


def announced(bus: Any, run_name: str, expect: int) -> list[dict]:
    return [a for a in bus.values(T.WEIGHTS, expect=expect) if a["run_name"] == run_name]


def final_weights(announcements: list[dict]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(max(announcements, key=lambda a: a["version"])["uri"].removeprefix("file://"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def last_gauges(bus: Any, run_name: str) -> dict[str, float]:
    """The gauges of the run's last sip.metrics record (written at its graceful stop: the last step's)."""
    mine = [m for m in bus.values(T.METRICS) if m["source"] == "learner" and m["instance"] == run_name]
    return mine[-1]["gauges"]


def final_state(tmp_path: Path, run_name: str) -> dict:
    latest = max((tmp_path / "runs" / run_name / "learner").glob("step-*"))
    return json.loads((latest / "state.json").read_text())


# --------------------------------------------------------------------------- equivalence


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dpo", "nll"])
def test_two_ranks_train_like_one_process(bus, tiny_cfg, tmp_path, make_pair, figures, algo) -> None:
    bus.produce(T.PAIRS, [make_pair(i) for i in range(PAIRS)], key="one-partition")  # a fixed order
    single_s = finish(start_single(tiny_cfg, "single", tmp_path, algo=algo), tmp_path / "single.log", 300)
    ddp_s = finish(start_ddp(tiny_cfg, "ddp", tmp_path, algo=algo), tmp_path / "ddp.log", 300)

    # The same records in the same steps (the last step holds one pair: rank 1 trains nothing in it).
    single_log, ddp_log = consumption(tmp_path, "single"), consumption(tmp_path, "ddp")
    assert ddp_log == single_log
    assert [len(line["trained"]) for line in single_log] == [4, 4, 4, 4, 4, 1]
    # The same versions at the same steps (every 2 steps; the last at the final step 6).
    single_weights, ddp_weights = announced(bus, "single", 3), announced(bus, "ddp", 6)
    assert [(a["version"], a["step"]) for a in ddp_weights] == [(a["version"], a["step"]) for a in single_weights]
    assert [a["step"] for a in single_weights] == [2, 4, 6]
    # The same counters, and the same weights up to the order of the gradient additions.
    single_state, ddp_state = final_state(tmp_path, "single"), final_state(tmp_path, "ddp")
    assert ddp_state["counters"] == single_state["counters"]
    assert ddp_state["counters"]["pairs_trained"] == PAIRS
    initial = final_weights([{"version": 0, "uri": single_weights[0]["uri"]}])
    diff = max_abs_diff(final_weights(single_weights), final_weights(ddp_weights))
    moved = max_abs_diff(final_weights(single_weights), initial)
    assert diff <= WEIGHT_TOLERANCE < moved
    gauges = {run: last_gauges(bus, run) for run in ("single", "ddp")}
    assert gauges["ddp"]["step"] == gauges["single"]["step"] == STEPS
    for name in ("loss", "grad_norm"):
        assert gauges["ddp"][name] == pytest.approx(gauges["single"][name], rel=GAUGE_TOLERANCE), name
    figures(f"ddp_equivalence_{algo}", pairs=PAIRS, steps=STEPS, ranks=2, max_abs_weight_diff=diff,
            max_abs_weight_move_since_step_2=moved, bit_identical=diff == 0.0, single_run_s=round(single_s, 1),
            ddp_run_s=round(ddp_s, 1))


# --------------------------------------------------------------------------- faults


def rank_pid(torchrun: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of worker `rank` under this torchrun (a child whose environment says RANK=rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path("/proc").glob("[0-9]*"):
            try:
                stat = (child / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                environ = (child / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if parent == torchrun.pid and f"RANK={rank}".encode() in environ:
                return int(child.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under torchrun pid {torchrun.pid}")


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_of_a_rank_stops_the_job_and_a_restart_trains_every_pair_once(bus, tiny_cfg, tmp_path, make_pair,
                                                                            figures, victim) -> None:
    bus.produce(T.PAIRS, [make_pair(i) for i in range(PAIRS)], key="one-partition")
    log = tmp_path / "killed.log"
    job = start_ddp(tiny_cfg, "killed", tmp_path)
    pid = rank_pid(job, victim)
    checkpoints = tmp_path / "runs" / "killed" / "learner"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-00000002").exists():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = job.wait(90)  # torchrun sees the dead worker and stops the other: nobody waits on a collective
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(f"torchrun still running 90 s after kill -9 of rank {victim}: {log.read_text()[-3000:]}")
    stopped_s = time.monotonic() - killed_at
    assert code != 0
    checkpoint_at_kill = final_state(tmp_path, "killed")["step"]
    assert checkpoint_at_kill < STEPS  # killed mid-run

    restart_s = finish(start_ddp(tiny_cfg, "killed", tmp_path), log, 300)

    state = final_state(tmp_path, "killed")
    assert state["step"] == STEPS
    assert state["counters"]["pairs_trained"] == PAIRS and state["counters"].get("skipped_duplicate", 0) == 0
    assert sorted(state["seen_ids"]) == sorted(f"p{i}:1" for i in range(PAIRS))  # each pair once, none skipped
    entries = consumption(tmp_path, "killed")  # every record once, in order, in the steps of an uninterrupted run
    assert [offset for entry in entries for _, offset in entry["records"]] == list(range(PAIRS))
    assert [(entry["batch"], entry["step"], len(entry["trained"])) for entry in entries] == [
        (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 4, 4), (4, 5, 4), (5, 6, 1)]
    assert max(a["step"] for a in announced(bus, "killed", 3)) == STEPS
    figures(f"ddp_kill_9_rank_{victim}", pairs=PAIRS, steps=STEPS, checkpoint_step_at_kill=checkpoint_at_kill,
            torchrun_stopped_s=round(stopped_s, 1), restarted_run_s=round(restart_s, 1),
            pairs_trained=state["counters"]["pairs_trained"])


@pytest.mark.slow
def test_ranks_wait_for_pairs_longer_than_the_collective_timeout(bus, tiny_cfg, tmp_path, make_pair) -> None:
    # Rank 1 waits for each step in a broadcast that times out after dist_timeout_s; rank 0's wait for
    # pairs has no bound, so its keep-alives (every quarter of the timeout) must keep rank 1 in the job.
    log = tmp_path / "waiting.log"
    job = start_ddp(tiny_cfg, "waiting", tmp_path, dist_timeout_s=8, max_steps=1, idle_timeout_s=600)
    deadline = time.monotonic() + 300
    while b'"learner started"' not in log.read_bytes():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(3 * 8)  # three timeouts without a pair
    assert job.poll() is None, log.read_text()[-3000:]
    bus.produce(T.PAIRS, [make_pair(i) for i in range(4)], key="one-partition")
    finish(job, log, 120)
    assert final_state(tmp_path, "waiting")["counters"]["pairs_trained"] == 4


@pytest.mark.slow
def test_gpu_check_script_runs_its_cpu_side() -> None:
    # The GPU run happens only where a device is lent; its CPU side (the same phases, gloo) keeps it working.
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=540, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    figures = json.loads(done.stdout.rsplit("GPU_CHECK ", 1)[1])
    assert figures["learner_steps"] == 6 and figures["publications"] == 3
    assert figures["rollout_policy_version_after_reload"] == 3 and figures["ddp_world_size"] == 1
