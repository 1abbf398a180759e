"""The CUDA path of sipstream with tiny models, on the embedded broker; run by scripts/gpu_check.sh.

    python scripts/gpu_check.py --device cuda     # or cpu: the same steps (the check of this script itself)

Four phases, each printing its figures, then one JSON line (`GPU_CHECK {...}`) with all of them:
1. rollout: the rollout stage generates on the device through the real runner (sip.rewritten → sip.rollouts);
   tokens/s counts the generated tokens.
2. learner: `run_learner` trains DPO on the device (bf16 autocast on CUDA, float32 on CPU), publishing every
   2 steps; step time and tokens/s from its last sip.metrics record.
3. publish → reload: while the learner runs, the rollout stage receives each sip.weights announcement and
   loads the weights between batches (`on_control`, `before_batch`), as a worker does; seconds from the
   announcement's `created_at` to the weights in place, and the load alone.
4. DDP: `torchrun --nproc_per_node=1 -m sipstream.learner` on the same pairs: a process group of one
   (NCCL on CUDA, gloo on CPU) around the same learner; its wall time and step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from sipstream.bus import topics as T  # noqa: E402
from sipstream.bus.broker import EmbeddedBroker, free_port  # noqa: E402
from sipstream.config import load_config  # noqa: E402

PAIRS = 24
STEPS = 6


def make_pair(i: int) -> dict[str, Any]:
    good, bad = f" the river ran quietly past house {i}.", " zebra zebra zebra!!"
    return {"item_id": f"p{i}:1", "doc_id": f"p{i}", "prefix": f"Chapter {i}. In the morning", "suffix": good,
            "seed": i, "policy_version": 0, "target": {"kind": "rollout", "index": 0, "text": good, "total": 2.0},
            "chosen": {"kind": "rollout", "index": 0, "text": good, "total": 2.0},
            "rejected": {"kind": "rollout", "index": 1, "text": bad, "total": 0.5}}


def make_rewritten(i: int) -> dict[str, Any]:
    return {"item_id": f"r{i}:1", "doc_id": f"r{i}", "chunk_index": 1, "prefix": f"Chapter {i}. Once upon a time",
            "suffix": " there lived a miller who had three sons and a cat that could talk to birds.",
            "seed": i, "rewrite": None, "why": ["kept"]}


def produce(bootstrap: str, topic: str, values: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value=json.dumps(value).encode(), key=b"one-partition")
    assert producer.flush(30) == 0


def read_all(bootstrap: str, topic: str, partitions: int, quiet_s: float = 2.0) -> list[dict[str, Any]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "gpu-check-reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out, quiet_since = [], time.monotonic()
    try:
        while time.monotonic() - quiet_since < quiet_s:
            msgs = [m for m in consumer.consume(500, timeout=0.2) if m.error() is None]
            if msgs:
                out.extend(json.loads(m.value()) for m in msgs)
                quiet_since = time.monotonic()
    finally:
        consumer.close()
    return out


def config(broker: EmbeddedBroker, work: Path, device: str, run_name: str) -> Any:
    from sipstream.config import merged

    cfg = load_config(overrides=[f"bus.bootstrap_servers={broker.bootstrap_servers}", "bus.topic_prefix=gpu.",
                                 "bus.group_prefix=gpu.group", "runner.batch_size=8", "runner.batch_timeout_s=0.2",
                                 "runner.metrics_interval_s=1"], env={})
    return merged(cfg, run_name=run_name, run_dir=str(work / "runs"), rollout={"rollouts": 4},
                  models={"policy": {"source": "tiny-gpt2", "cache_dir": str(work / "models"), "device": device,
                                     "max_prompt_tokens": 64}})


def learner_settings(device: str) -> dict[str, Any]:
    return {"algo": "dpo", "device": device, "precision": "bfloat16" if device == "cuda" else "float32",
            "lr": 1e-3, "batch_pairs": 2, "grad_accum": 2, "max_steps": STEPS, "sync_every": 2,
            "checkpoint_every": 2, "max_policy_lag": 100, "poll_timeout_s": 0.2, "dist_timeout_s": 120}


# --------------------------------------------------------------------------- 1. rollout


def rollout_phase(cfg: Any, bootstrap: str) -> tuple[Any, dict[str, float]]:
    from sipstream.bus.runner import StageRunner
    from sipstream.models.hf import HFModel
    from sipstream.stages.rollout import RolloutStage

    stage = RolloutStage(HFModel(cfg.models.policy), cfg.rollout, cfg.run_name)
    items = 32
    produce(bootstrap, cfg.bus.topic(T.REWRITTEN), [make_rewritten(i) for i in range(items)])
    started = time.perf_counter()
    StageRunner(stage, cfg, bootstrap).run(until=lambda s: s.counters["consumed"] >= items)
    seconds = time.perf_counter() - started
    rollouts = read_all(bootstrap, cfg.bus.topic(T.ROLLOUTS), T.load_specs()[T.ROLLOUTS].partitions)
    tokens = sum(stage.policy.count_tokens(text) for record in rollouts for text in record["rollouts"])
    figures = {"rollout_items": items, "rollout_generated_tokens": tokens, "rollout_s": round(seconds, 2),
               "rollout_tokens_per_s": round(tokens / seconds, 1), "rollout_device": str(stage.policy.device)}
    return stage, figures


# --------------------------------------------------------------------------- 2 and 3. learner, publish → reload


def watch_and_reload(stage: Any, cfg: Any, bootstrap: str, done: threading.Event) -> list[tuple[float, float]]:
    """Each announcement of this run, loaded into the rollout stage as a worker does: (announce→loaded s, load s)."""
    topic = cfg.bus.topic(T.WEIGHTS)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "gpu-check-weights", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 20})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(T.load_specs()[T.WEIGHTS].partitions)])
    timings: list[tuple[float, float]] = []
    drain_until = None
    try:
        # Until the learner is done and 2 s more (its last announcement may still be on the way).
        while drain_until is None or time.monotonic() < drain_until:
            if drain_until is None and done.is_set():
                drain_until = time.monotonic() + 2.0
            for msg in consumer.consume(10, timeout=0.1):
                if msg.error() is not None:
                    continue
                value = json.loads(msg.value())
                if value.get("run_name") != cfg.run_name:
                    continue
                stage.on_control(T.WEIGHTS, value)
                load_started = time.perf_counter()
                stage.before_batch()  # a rollout worker loads pending weights here, between batches
                loaded = time.time()
                created = datetime.fromisoformat(value["created_at"].replace("Z", "+00:00")).timestamp()
                timings.append((loaded - created, time.perf_counter() - load_started))
    finally:
        consumer.close()
    return timings


def learner_phase(stage: Any, cfg: Any, bootstrap: str, device: str) -> dict[str, Any]:
    from sipstream.config.learner import LearnerConfig
    from sipstream.learner.loop import run_learner

    produce(bootstrap, cfg.bus.topic(T.PAIRS), [make_pair(i) for i in range(PAIRS)])
    done, result = threading.Event(), {}

    def train() -> None:
        try:
            result["state"] = run_learner(cfg, bootstrap, learner=LearnerConfig(**learner_settings(device)),
                                          instance_id=cfg.run_name, handle_signals=False)
        finally:
            done.set()

    trainer = threading.Thread(target=train, name="learner")
    started = time.perf_counter()
    trainer.start()
    timings = watch_and_reload(stage, cfg, bootstrap, done)
    trainer.join()
    seconds = time.perf_counter() - started
    if "state" not in result:
        raise SystemExit("gpu_check: the learner failed (its traceback is above)")
    state = result["state"]
    assert state.step == STEPS and stage.policy_version == state.version, (state.step, stage.policy_version)
    gauges = last_learner_metrics(cfg, bootstrap, cfg.run_name)
    return {"learner_precision": learner_settings(device)["precision"], "learner_steps": state.step,
            "learner_run_s": round(seconds, 2), "learner_step_s": round(gauges["step_seconds"], 4),
            "learner_step_tokens_per_s": round(gauges["step_tokens_per_s"], 1),
            "publications": len(timings), "rollout_policy_version_after_reload": stage.policy_version,
            "publish_to_reload_s_median": round(statistics.median(t for t, _ in timings), 3),
            "reload_s_median": round(statistics.median(s for _, s in timings), 4)}


def last_learner_metrics(cfg: Any, bootstrap: str, instance: str) -> dict[str, float]:
    records = read_all(bootstrap, cfg.bus.topic(T.METRICS), T.load_specs()[T.METRICS].partitions)
    mine = [r for r in records if r.get("source") == "learner" and r.get("instance") == instance
            and r["gauges"].get("step_seconds") is not None]
    return mine[-1]["gauges"]


# --------------------------------------------------------------------------- 4. DDP at world size 1


def ddp_phase(cfg: Any, bootstrap: str, device: str, work: Path) -> dict[str, Any]:
    run_name = "gpu-check-ddp"
    settings = {"bus.topic_prefix": cfg.bus.topic_prefix, "bus.group_prefix": "gpu.ddp", "run_name": run_name,
                "run_dir": cfg.run_dir, "models.policy.source": "tiny-gpt2",
                "models.policy.cache_dir": str(cfg.models.policy.cache_dir), "models.policy.device": device,
                "models.policy.max_prompt_tokens": 64, "runner.metrics_interval_s": 1,
                **{f"learner.{k}": v for k, v in learner_settings(device).items()}}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "sipstream.learner",
               "--bootstrap", bootstrap, f"--instance-id={run_name}", *(f"--set={k}={v}" for k, v in settings.items())]
    log = work / "ddp.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=240,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert '"world_size": 1' in text, text[-3000:]
    gauges = last_learner_metrics(cfg, bootstrap, run_name)
    return {"ddp_backend": "nccl" if device == "cuda" else "gloo", "ddp_world_size": 1,
            "ddp_run_s": round(seconds, 2), "ddp_step_s": round(gauges["step_seconds"], 4)}


def timed(name: str, phase: Any) -> Any:
    """Run one phase and print its figures (a phase returns them, or a tuple ending with them)."""
    started = time.perf_counter()
    result = phase()
    numbers = result[-1] if isinstance(result, tuple) else result
    print(f"[{name} {time.perf_counter() - started:.1f}s] " + ", ".join(f"{k}={v}" for k, v in numbers.items()),
          flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --cpu to check the script itself)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    figures: dict[str, Any] = {"device": args.device, "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sipstream-gpu-check-") as scratch:
        work = Path(scratch)
        broker = EmbeddedBroker()
        broker.start()
        try:
            cfg = config(broker, work, args.device, "gpu-check")
            T.create_topics(cfg.bus, broker.bootstrap_servers, T.load_specs())
            stage, numbers = timed("rollout", lambda: rollout_phase(cfg, broker.bootstrap_servers))
            figures.update(numbers)
            figures.update(timed("learner", lambda: learner_phase(stage, cfg, broker.bootstrap_servers, args.device)))
            figures.update(timed("ddp", lambda: ddp_phase(cfg, broker.bootstrap_servers, args.device, work)))
        finally:
            broker.stop()
    figures["total_s"] = round(time.perf_counter() - started, 1)
    print("GPU_CHECK " + json.dumps(figures), flush=True)
    if os.environ.get("OUT"):  # the device machine's folder that comes back
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
