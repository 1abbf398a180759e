"""The learner: trains the policy from `sip.pairs` and publishes weights on `sip.weights`.

`algo` picks the loss: online DPO against a frozen reference, the paper's reward-filtered NLL, or the
plain next-token (`pretrain`) baseline. See `sipstream.learner.loop` for the loop and its delivery
guarantee, `sipstream.learner.distributed` for torchrun. Importing this package is cheap (no torch).
"""

from __future__ import annotations

from typing import Any

from sipstream.config.learner import LearnerConfig
from sipstream.learner.loop import run_learner as run

__all__ = ["LearnerConfig", "run_learner"]


def run_learner(cfg: Any, bootstrap: str, **kwargs: Any) -> Any:
    """Entry point (lazy import of torch): see `sipstream.learner.loop.run_learner`."""

    return run(cfg, bootstrap, **kwargs)
