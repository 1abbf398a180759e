"""`sipstream eval`: a policy against a baseline on held-out data, along the paper's axes.

- **win rate**: model and baseline continue the same held-out clean prefixes (seeded sampling, the
  same per-prompt seeds); the judge compares each pair in both orders; wins / ties / losses, rate =
  (wins + ties/2) / n with a 95% Wilson interval;
- **safety**: continuations of held-out RealToxicityPrompts prefixes; share judged safe (P(safe) >
  0.5) and share the alt-profanity-check classifier finds inoffensive, each with its interval, and
  their agreement;
- **factuality**: share of held-out true/false minimal pairs where the true statement has the higher
  length-normalised log-probability, with its interval and the mean margin;
- **quality**: the judge's preference for the model's continuation over the original suffix, and the
  perplexity of held-out clean text (a policy that games the judge shows up here).

Held-out sets come from :mod:`sipstream.eval.heldout` and never reach the training stream.

Result (``evaluate()`` returns it; ``eval.json`` holds it)::

    {"model", "baseline", "model_sha256", "baseline_sha256", "created_at", "eval_config",
     "win_rate": {"wins", "ties", "losses", "n", "rate", "ci95": [lo, hi], "interval": "wilson"} | null,
     "safety": {"model": {"n", "judge_safe_rate", "judge_ci95", "classifier_safe_rate",
                          "classifier_ci95", "agreement"}, "baseline": {...} | null},
     "factuality": {"model": {"n", "accuracy", "ci95", "mean_margin"}, "baseline": ... },
     "quality": {"model": {"judge_quality", "perplexity", "tokens"}, "baseline": ... },
     "cost": {"generation_s", "judge_calls", "judge_s", "total_s"}}

Cost with the real CPU models of ``configs/tiny.yaml`` (SmolLM2-135M policy, Gemma-3-270M judge),
measured on the shared 2-core build machine while other jobs kept its load average at 4-9 (so these
are upper bounds), at 24 win-rate / 24 safety prompts, 100 factuality pairs, 4 perplexity documents
and 40 new tokens: the first arm (model and baseline, nothing cached) 1,120 s, of which sampling
674 s and 192 judge prompts 284 s; a second arm against the same (cached) baseline 427 s: sampling
112 s, 120 judge prompts 151 s, factuality and perplexity (4 x 512 tokens) about 160 s. The defaults
were then cut to 32 new tokens and 256 perplexity tokens per document; ``eval.*`` settings trade
time for interval width.

Importing this package is cheap (pydantic only); models load on first use.
"""

from __future__ import annotations

from sipstream.eval.config import EvalConfig
from sipstream.eval.heldout import (
    heldout_corpus,
    heldout_probes,
    training_corpus,
    training_probes,
)
from sipstream.eval.policy import load_policy
from sipstream.eval.run import clear_caches, evaluate

__all__ = [
    "EvalConfig",
    "clear_caches",
    "evaluate",
    "heldout_corpus",
    "heldout_probes",
    "load_policy",
    "training_corpus",
    "training_probes",
]
