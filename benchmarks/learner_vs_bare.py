"""The learner's loss and step phases against a bare PyTorch loop, round by round, with a profile of each side.

The suite's learner section measures this too, in fewer rounds next to everything else; this measures only
the ratio, on the embedded default's policy (SmolLM2-135M): both sides alternated for several rounds of
several optimizer steps (the order flipped every round), each round's ratio reported, so a burst of load
from elsewhere shows as one odd round instead of the result; then one step of each side under torch's
profiler, split into the loss phase (padding, forward, backward) and the step phase (clipping, AdamW).
A third side in the same rounds is the learner with torch's default AdamW (the learner before it used
`fused=True`), so the table shows what the fused optimizer changed and what the loss phase does alone.

    python -m benchmarks.learner_vs_bare [--rounds 5] [--steps 6] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

DEFAULT_ADAMW = "learner, default AdamW"


def with_default_adamw(policy: Any, cfg: Any) -> Any:
    """A copy of the learner's policy whose AdamW is torch's default implementation instead of the fused
    one: the learner as it was before `fused`, to show what that changed (same model copy, same schedule)."""
    import copy

    import torch

    from sipstream.learner.policy import lr_factor

    model = copy.deepcopy(policy.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return dataclasses.replace(policy, model=model, train_model=model, optimizer=optimizer, scheduler=scheduler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="policy (default: configs/tiny.yaml's)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.bench_learner import PHASES, build_sides, learner_loop, step_profiles
    from benchmarks.context import TINY
    from benchmarks.machine import machine_info
    from benchmarks.measure import alternated_rounds, round_ratios, torch_op_profile
    from sipstream.config import load_config

    source = args.source or load_config(TINY, env={}).models.policy.source
    machine = machine_info()
    bench = argparse.Namespace(source=source, batch=args.batch, steps=args.steps, prefix_words=80, max_seq_tokens=256,
                               rounds=args.rounds)
    sides = build_sides(bench)
    unfused = with_default_adamw(sides.policy, sides.cfg)
    rounds = alternated_rounds({"learner": sides.learner, "bare": sides.bare,
                                DEFAULT_ADAMW: lambda: learner_loop(unfused, sides.cfg, sides.batches)},
                               args.rounds, warmup=1)
    measured = round_ratios(rounds, "learner", "bare")
    unfused_ratio = round_ratios(rounds, DEFAULT_ADAMW, "bare")
    for index, row in enumerate(rounds):
        print(f"round {index + 1}: " + ", ".join(f"{name} {rate:.1f} tokens/s" for name, rate in row.items())
              + f"; learner / bare {row['learner'] / row['bare']:.2f}", flush=True)
    profiles = step_profiles(sides)
    learner_loop(unfused, sides.cfg, sides.batches[:1])
    profiles[DEFAULT_ADAMW] = torch_op_profile(lambda: learner_loop(unfused, sides.cfg, sides.batches[:1]), PHASES)
    examples = [e for batch in sides.batches for e in batch]
    tokens_per_pair = sum(e.tokens for e in examples) / len(examples)
    load_after = [round(x, 2) for x in os.getloadavg()]
    result = {
        "when": machine["date"], "machine": machine, "load_average_at_end": load_after,
        "setup": f"policy {source}, {args.rounds} rounds × {args.steps} optimizer steps × {args.batch} pairs per side "
                 f"(pretrain objective, {tokens_per_pair:.0f} tokens per pair), torch {torch.get_num_threads()} threads",
        "rounds": rounds, **measured, "default_adamw": unfused_ratio, "profiles": profiles, "target": 0.8,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learner_vs_bare.json").write_text(json.dumps(result, indent=2) + "\n")
    median, best = measured["median"], measured["best_over_best"]
    lines = [
        "# Learner phases vs a bare PyTorch loop",
        "",
        f"Generated by `python -m benchmarks.learner_vs_bare` on {result['when']}; {machine['cpu_count']} × "
        f"{machine['cpu_model']}, torch {machine['torch']}, Python {platform.python_version()}; load average "
        f"{machine['load_average_at_start'][0]} at the start, {load_after[0]} at the end; code {machine['git_commit']}"
        f"{' + local changes' if machine['git_dirty'] else ''}.",
        f"Setup: {result['setup']}; both sides alternated after a warm-up round, the order flipped every round.",
        "",
        "| round | learner tokens/s | bare loop tokens/s | learner / bare | learner with torch's default AdamW "
        "tokens/s | its ratio to bare |",
        "|---|---|---|---|---|---|",
        *(f"| {i + 1} | {r['learner']:.1f} | {r['bare']:.1f} | {r['learner'] / r['bare']:.2f}× | "
          f"{r[DEFAULT_ADAMW]:.1f} | {r[DEFAULT_ADAMW] / r['bare']:.2f}× |" for i, r in enumerate(rounds)),
        "",
        f"Learner / bare, median round: **{median:.2f}×** (rounds {measured['low']:.2f}–{measured['high']:.2f}×), best "
        f"over best: {best:.2f}× (target ≥ 0.8×: {'met' if median >= 0.8 else 'not met'}). The learner with torch's "
        f"default AdamW, as before `fused` (same rounds): {unfused_ratio['median']:.2f}× of the bare loop "
        f"(rounds {unfused_ratio['low']:.2f}–{unfused_ratio['high']:.2f}×).",
        "",
        "One step of each side under torch's profiler (seconds; `loss`: padding, forward, backward; `step`: "
        "clipping, AdamW, zeroing the gradients):",
        "",
        "| side | whole step | " + " | ".join(f"{phase} phase" for phase in PHASES) + " |",
        "|---|---|" + "---|" * len(PHASES),
        *(f"| {name} | {profiles[name]['seconds']:.2f} | "
          + " | ".join(f"{profiles[name]['phases'].get(phase, 0):.2f}" for phase in PHASES) + " |"
          for name in ("learner", "bare", DEFAULT_ADAMW)),
    ]
    for name in ("learner", "bare", DEFAULT_ADAMW):
        lines += ["", f"Top operators, {name} (own CPU time):", "", "| operator | calls | own s | total s |",
                  "|---|---|---|---|"]
        lines += [f"| `{r['function']}` | {r['calls']} | {r['tottime_s']} | {r['cumtime_s']} |"
                  for r in profiles[name]["rows"]]
    (args.out / "learner_vs_bare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
