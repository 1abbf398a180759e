"""Capacity model: how many rollout, judge and learner GPUs (and partitions) a token rate needs.

    .venv/bin/python -m benchmarks.capacity                       # the scenarios below -> results/capacity.md
    .venv/bin/python -m benchmarks.capacity --measure             # + a CPU check of the rollout arithmetic
    .venv/bin/python -m benchmarks.capacity --tokens-per-day 2e8 --gpu H100 --rollouts 16

The arithmetic, per item (one suffix of `suffix_tokens` original tokens and its prefix):
- rollout: `rollouts` samples of `suffix_tokens` tokens (decode) after one prefill of the prefix
  (vLLM's prefix cache shares it between the samples);
- rewrite: one safety screen (a judge-sized call) plus, for the `rewrite_share` of items judged
  unsafe, `rewrite_candidates` generations of ~`suffix_tokens` tokens by the rewriter;
- judge: n = rollouts + 1 (original) + 1 (rewrite) candidates; quality compares every ordered pair,
  n(n-1) calls; safety samples each candidate `safety_samples` times and factuality once, n(s+1)
  calls. Each call reads `judge_prompt_tokens` (prefix excerpt + candidates + instructions; a
  `judge_prefix_cache_hit` share of it is served from the prefix cache) and writes
  `judge_output_tokens` (1 for logit scoring, ~100 for a generative verdict);
- learner: one DPO pair per item: the policy's forward+backward on 2 sequences (6·N·tokens FLOPs)
  and the frozen reference's forward on 2 sequences (2·N·tokens).

GPU throughput is FLOPs-based: peak dense bf16 FLOP/s × an assumed utilisation per phase (decode is
memory-bound and runs at a low MFU; prefill and training much higher). **Every GPU figure is an
estimate** (no GPU was available where this was written); replace the MFU assumptions with measured
tokens/s (`--decode-tps`, `--prefill-tps`, `--judge-tps`) once you have them.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SECONDS_PER_DAY = 86_400
RESULTS = Path(__file__).resolve().parent / "results" / "capacity.md"

# Peak dense bf16 tensor FLOP/s (vendor datasheets, no sparsity) and memory per GPU.
GPUS: dict[str, tuple[float, int]] = {
    "L4": (121e12, 24),
    "A10G": (70e12, 24),
    "L40S": (362e12, 48),
    "A100-80GB": (312e12, 80),
    "H100-SXM": (989e12, 80),
    "H200": (989e12, 141),
}


@dataclass(frozen=True)
class Workload:
    tokens_per_day: float = 65.5e6
    """Original document tokens entering the loop per day (the paper's run: 2,000 steps x 256 items x 128 tokens ~ 65.5M)."""
    suffix_tokens: int = 128
    prefix_tokens: int = 1024
    """Mean prefix length fed to rollout and learner (up to max_context_tokens - suffix_tokens)."""
    rollouts: int = 16
    rewrite_share: float = 0.2
    """Share of items whose suffix the rewriter rewrites (the rest are copied)."""
    rewrite_candidates: int = 4
    safety_samples: int = 5
    judge_prompt_tokens: int = 600
    judge_output_tokens: int = 1
    judge_prefix_cache_hit: float = 0.5
    judge_concurrency: int = 64
    """Requests one judge-stage worker keeps in flight to the judge server (models.judge.concurrency)."""
    judge_call_latency_s: float = 0.5
    """Latency of one judge call under load (logit scoring; a generative verdict takes seconds)."""
    policy_params: float = 1.4e9
    judge_active_params: float = 5.1e9
    """Active parameters per token: GPT-OSS-120B is a mixture of experts with ~5.1B active; Llama-3.1-8B: 8e9."""


@dataclass(frozen=True)
class Hardware:
    gpu: str = "H100-SXM"
    decode_mfu: float = 0.10
    prefill_mfu: float = 0.40
    train_mfu: float = 0.35
    headroom: float = 0.7
    """Plan for this share of the computed capacity (bursts, rebalances, restarts)."""
    decode_tps: float | None = None
    """Measured policy decode tokens/s per GPU; overrides the MFU estimate."""
    prefill_tps: float | None = None
    judge_tps: float | None = None
    """Measured judge prompt tokens/s per GPU (prefill-dominated); overrides the estimate."""


@dataclass
class Plan:
    items_per_s: float
    candidates: int
    judge_calls_per_item: int
    rollout_gpus: int
    rewrite_gpus: int
    judge_gpus: int
    judge_workers: int
    """Judge-stage pods (CPU clients of the judge server); this, not judge_gpus, needs partitions."""
    learner_gpus: int
    partitions: dict[str, int] = field(default_factory=dict)
    detail: dict[str, float] = field(default_factory=dict)


def judge_calls_per_item(rollouts: int, safety_samples: int, with_rewrite: bool = True) -> tuple[int, int]:
    """(candidates n, judge calls): n(n-1) ordered pairwise quality calls + n(safety_samples + 1) pointwise."""
    n = rollouts + 1 + (1 if with_rewrite else 0)
    return n, n * (n - 1) + n * (safety_samples + 1)


def plan(w: Workload, hw: Hardware) -> Plan:
    peak, _ = GPUS[hw.gpu]
    items_per_s = w.tokens_per_day / w.suffix_tokens / SECONDS_PER_DAY
    n, calls = judge_calls_per_item(w.rollouts, w.safety_samples)

    decode_tps = hw.decode_tps or peak * hw.decode_mfu / (2 * w.policy_params)
    prefill_tps = hw.prefill_tps or peak * hw.prefill_mfu / (2 * w.policy_params)
    rollout_s = w.rollouts * w.suffix_tokens / decode_tps + w.prefix_tokens / prefill_tps  # GPU-seconds per item

    judge_prompt_tps = hw.judge_tps or peak * hw.prefill_mfu / (2 * w.judge_active_params)
    judge_decode_tps = peak * hw.decode_mfu / (2 * w.judge_active_params)
    per_call = w.judge_prompt_tokens * (1 - w.judge_prefix_cache_hit) / judge_prompt_tps + w.judge_output_tokens / judge_decode_tps
    judge_s = calls * per_call
    rewrite_s = per_call + w.rewrite_share * w.rewrite_candidates * w.suffix_tokens * 1.25 / judge_decode_tps

    seq_tokens = 2 * (w.prefix_tokens + w.suffix_tokens)  # chosen + rejected
    learner_flops = seq_tokens * (6 + 2) * w.policy_params
    learner_s = learner_flops / (peak * hw.train_mfu)

    def gpus(seconds_per_item: float) -> int:
        return max(1, math.ceil(items_per_s * seconds_per_item / hw.headroom))

    p = Plan(
        items_per_s=items_per_s, candidates=n, judge_calls_per_item=calls,
        rollout_gpus=gpus(rollout_s), rewrite_gpus=gpus(rewrite_s), judge_gpus=gpus(judge_s), learner_gpus=gpus(learner_s),
        judge_workers=max(1, math.ceil(items_per_s * calls * w.judge_call_latency_s / w.judge_concurrency / hw.headroom)),
        detail={"rollout_gpu_s_per_item": rollout_s, "judge_gpu_s_per_item": judge_s, "rewrite_gpu_s_per_item": rewrite_s,
                "learner_gpu_s_per_item": learner_s, "decode_tps_per_gpu": decode_tps, "judge_prompt_tps_per_gpu": judge_prompt_tps},
    )
    # A stage's parallelism is capped by its input topic's partitions; leave 2x room to scale out
    # without repartitioning (adding partitions later moves keys, see sipstream/bus/sync.py).
    def room(workers: int) -> int:
        return max(4, 2 ** math.ceil(math.log2(2 * workers)))

    p.partitions = {
        "sip.documents": 4,
        "sip.prefixes": room(p.rewrite_gpus),
        "sip.rewritten": room(p.rollout_gpus),
        "sip.rollouts": room(p.judge_workers),
        "sip.judged": 4,
        "sip.pairs": 4,  # one logical consumer (learner rank 0)
    }
    return p


# --------------------------------------------------------------------------- CPU check


def measure_cpu(items: int = 8, rollouts: int = 2, suffix_tokens: int = 16, repeats: int = 5) -> dict[str, float]:
    """Time the real rollout stage with the tiny GPT-2 on CPU, and compare its items/s with the model's
    prediction from the same policy's measured decode tokens/s (`rollouts × suffix_tokens` tokens per item)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sipstream.config import load_config, project_root
    from sipstream.stages.rollout import build

    cfg = load_config(project_root() / "configs" / "smoke.yaml", [f"rollout.rollouts={rollouts}"], env={})
    stage = build(cfg)
    words = " ".join(f"word{i}" for i in range(60))
    suffix = " ".join(["tok"] * suffix_tokens)
    batch = [{"item_id": f"i{i}", "doc_id": f"d{i}", "chunk_index": 0, "prefix": words, "suffix": suffix, "seed": i,
              "rewrite": None, "why": []} for i in range(items)]
    length = stage.policy.count_tokens(suffix)
    prompts = [words] * (items * rollouts)

    def generate() -> None:
        stage.policy.generate(prompts, length, list(range(len(prompts))), 1.0, 1.0)

    def run_stage() -> None:
        stage.process_batch(batch)

    # Interleaved, best of `repeats`: on a shared machine the load changes between runs, and
    # alternating the two keeps a burst of load from landing on one side only.
    generate(), run_stage()  # warm-up at the timed shapes
    decode_s = stage_s = float("inf")
    for _ in range(repeats):
        for fn, is_decode in ((generate, True), (run_stage, False)):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if is_decode:
                decode_s = min(decode_s, elapsed)
            else:
                stage_s = min(stage_s, elapsed)
    decode_tps = len(prompts) * length / decode_s
    measured = items / stage_s
    predicted = decode_tps / (rollouts * length)
    return {"decode_tps": decode_tps, "tokens_per_item": rollouts * length, "predicted_items_per_s": predicted,
            "measured_items_per_s": measured, "ratio": measured / predicted}


# --------------------------------------------------------------------------- report

SCENARIOS = [
    ("paper run in a day (1.4B policy, 16 rollouts, GPT-OSS-120B logit judge)", Workload(), Hardware()),
    ("same, generative judge verdicts (~100 tokens each)", Workload(judge_output_tokens=100), Hardware()),
    ("same, Llama-3.1-8B judge", Workload(judge_active_params=8e9), Hardware()),
    ("same, 4 rollouts", Workload(rollouts=4), Hardware()),
    ("paper run in a day on A100-80GB", Workload(), Hardware(gpu="A100-80GB")),
    ("paper run in a day on L40S", Workload(), Hardware(gpu="L40S")),
    ("1B tokens/day, H100", Workload(tokens_per_day=1e9), Hardware()),
]


def render(rows: list[tuple[str, Workload, Hardware, Plan]], cpu: dict[str, float] | None) -> str:
    out = [
        "# Capacity model (estimates)",
        "",
        "Generated by `python -m benchmarks.capacity` (model and assumptions in its docstring).",
        "**Every GPU number here is an estimate from peak FLOP/s × assumed utilisation; none was measured**",
        "(no GPU where this was written). Decode MFU 0.10, prefill 0.40, training 0.35, planned at 70% of capacity.",
        "Judge GPUs serve the judge model (deploy/k8s/judge-llm.yaml); judge workers are the CPU pods of the judge",
        "stage that call it (64 calls in flight each, 0.5 s per call) and are what sip.rollouts' partitions must cover.",
        "",
        "| scenario | GPU | items/s | candidates | judge calls/item | rollout GPUs | rewrite GPUs | judge GPUs | judge workers | learner GPUs | partitions (prefixes/rewritten/rollouts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _w, hw, p in rows:
        parts = "/".join(str(p.partitions[t]) for t in ("sip.prefixes", "sip.rewritten", "sip.rollouts"))
        out.append(f"| {name} | {hw.gpu} | {p.items_per_s:,.0f} | {p.candidates} | {p.judge_calls_per_item} | "
                   f"{p.rollout_gpus} | {p.rewrite_gpus} | {p.judge_gpus} | {p.judge_workers} | {p.learner_gpus} | {parts} |")
    out += ["", "Per-GPU throughput behind the table (estimates):", "",
            "| GPU | policy decode tok/s (1.4B) | judge prompt tok/s (5.1B active) | rollout items/s per GPU (16 × 128 tokens) |",
            "|---|---|---|---|"]
    for gpu in GPUS:
        p = plan(Workload(), Hardware(gpu=gpu))
        out.append(f"| {gpu} | {p.detail['decode_tps_per_gpu']:,.0f} | {p.detail['judge_prompt_tps_per_gpu']:,.0f} | "
                   f"{1 / p.detail['rollout_gpu_s_per_item']:,.1f} |")
    out += ["", "What the model says:", "",
            "- **The judge dominates.** With 16 rollouts there are 18 candidates: 306 ordered pairwise calls + 108 pointwise",
            "  calls = 414 judge calls per 128-token item. Judge GPUs grow with rollouts², rollout GPUs with rollouts.",
            "  Fewer rollouts, a smaller judge, fewer safety samples or comparing each pair in one order halve it.",
            "- The learner is cheap next to generation and judging: one DPO pair per item.",
            "- Partitions cap each stage's workers: `topics/` ships 4 per data topic, enough for the embedded default",
            "  and small clusters only. Raise them in the specs before a large run (`sipstream topics sync` grows",
            "  them; partitions can never be lowered).",
            ""]
    if cpu:
        out += ["## CPU check of the rollout arithmetic (measured here)", "",
                "The real rollout stage (`sipstream.stages.rollout`, tiny random GPT-2, 2 CPU cores) against the model's",
                "prediction from the same policy's measured decode rate:", "",
                "| decode tok/s | tokens per item | predicted items/s | measured items/s | measured / predicted |",
                "|---|---|---|---|---|",
                (f"| {cpu['decode_tps']:,.0f} | {cpu['tokens_per_item']:.0f} | {cpu['predicted_items_per_s']:.2f} | "
                f"{cpu['measured_items_per_s']:.2f} | {cpu['ratio']:.2f} |"), "",
                "Timings are interleaved best-of-5 on a shared 2-core machine (other jobs ran). While this was written,",
                "absolute rates moved by 2x between runs and the ratio ranged 0.79-0.99: the stage reaches 80-100% of the",
                "pure decode rate, the rest being its own per-batch work (token counting, grouping, seeding) at a size where",
                "the tiny model's decode is cheap. So the model's rollout GPU counts are a floor; plan with its headroom (70%).", "",
                "Known CPU figures (docs/pipeline.md, 2 cores) through the same formulas: SmolLM2-135M samples ≈57 tok/s at",
                "batch 8, so 2 rollouts × 128 tokens cost ≈4.5 s per item; the Gemma-270M logit judge takes ≈0.28 s per",
                "call, and n = 4 candidates need 4·3 + 4·6 = 36 calls ≈ 10 s per item: on a laptop the judge is already",
                "the bottleneck, as the model predicts for GPUs.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also time the rollout stage on CPU (tiny GPT-2)")
    parser.add_argument("--tokens-per-day", type=float)
    parser.add_argument("--rollouts", type=int)
    parser.add_argument("--gpu", choices=sorted(GPUS))
    parser.add_argument("--decode-tps", type=float, help="measured policy decode tokens/s per GPU")
    parser.add_argument("--judge-tps", type=float, help="measured judge prompt tokens/s per GPU")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    custom = {k: v for k, v in (("tokens_per_day", args.tokens_per_day), ("rollouts", args.rollouts)) if v is not None}
    hw_custom = {k: v for k, v in (("gpu", args.gpu), ("decode_tps", args.decode_tps), ("judge_tps", args.judge_tps)) if v}
    if custom or hw_custom:
        w, hw = replace(Workload(), **custom), replace(Hardware(), **hw_custom)
        p = plan(w, hw)
        print({**asdict(w), **asdict(hw)})
        print({k: v for k, v in asdict(p).items() if k != "detail"})
        return
    rows = [(name, w, hw, plan(w, hw)) for name, w, hw in SCENARIOS]
    cpu = measure_cpu() if args.measure else None
    args.output.write_text(render(rows, cpu) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
