"""The three training losses as short pure functions on tensors, and a registry keyed by `--algo`.

Names follow TRL: `chosen_logps` is the summed log-probability of the chosen continuation under the
policy, `ref_*` the same under the frozen reference, `*_logratios` their differences. Every function
returns per-example losses plus the weights they are averaged over, so the learner can accumulate
gradients across micro-batches and normalise once per optimizer step:

    step loss = Σ losses / Σ weights      (weights: 1 per pair for DPO, target tokens for NLL)

torch is imported lazily by callers; this module only needs it when a function runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from sipstream.config.learner import LearnerConfig


@dataclass
class LossOutputs:
    losses: Tensor
    """(B,) per-example loss; for token losses, summed over the example's tokens."""
    weights: Tensor
    """(B,) what `losses` are averaged over: 1 per pair (DPO) or the number of target tokens (NLL)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """(B,) detached per-example values (reward margin, accuracy, ...), reported as means over pairs."""

    def loss(self) -> Tensor:
        """The mean loss of this batch alone: Σ losses / Σ weights."""
        return self.losses.sum() / self.weights.sum()


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    *,
    nll_mix: float = 0.0,
    chosen_lengths: Tensor | None = None,
) -> LossOutputs:
    r"""Direct preference optimisation (Rafailov et al. 2023), optionally with an NLL term on the chosen.

    For a prefix x, chosen y_w and rejected y_l, with log π summed over the continuation's tokens:

        logits = (log π(y_w|x) − log π(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x))
        L_DPO  = −log σ(β · logits)
        L      = L_DPO + λ · (−log π(y_w|x) / |y_w|)          (λ = nll_mix; 0 = pure DPO)

    The implicit rewards r = β (log π − log π_ref) of chosen and rejected are reported: their margin
    and how often the chosen one wins (accuracy). Weights are 1: the step loss is a mean over pairs.
    """
    import torch
    import torch.nn.functional as F

    logratios = chosen_logps - rejected_logps  # (B,)
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # (B,)
    logits = logratios - ref_logratios  # (B,)
    losses = -F.logsigmoid(beta * logits)  # (B,)
    if nll_mix > 0:
        if chosen_lengths is None:
            raise ValueError("nll_mix > 0 needs chosen_lengths to normalise the NLL per token")
        losses = losses + nll_mix * (-chosen_logps / chosen_lengths.clamp(min=1))  # (B,)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()  # (B,)
    return LossOutputs(
        losses=losses,
        weights=torch.ones_like(losses),
        metrics={
            "reward_margin": chosen_rewards - rejected_rewards,
            "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach(),
        },
    )


def nll_loss(target_logps: Tensor, target_lengths: Tensor) -> LossOutputs:
    r"""Reward-filtered NLL (the paper's RF-NLL): next-token loss on the best candidate that passed the judge.

        L = −Σ_i log π(y_i | x, y_<i) / Σ_i 1      over every target token of the step

    target_logps: (B,) summed log-probabilities of each target; target_lengths: (B,) its token counts.
    The filtering itself happens upstream (assemble leaves `target` null when nothing passed).
    """
    losses = -target_logps  # (B,)
    return LossOutputs(
        losses=losses,
        weights=target_lengths.to(losses.dtype),
        metrics={"target_logps": target_logps.detach(), "target_tokens": target_lengths.detach().float()},
    )


def pretrain_loss(suffix_logps: Tensor, suffix_lengths: Tensor) -> LossOutputs:
    r"""The continued-pretraining baseline: the same token-mean NLL, on the original suffix.

        L = −Σ_i log π(s_i | x, s_<i) / Σ_i 1
    """
    return nll_loss(suffix_logps, suffix_lengths)


# --------------------------------------------------------------------------- registry


@dataclass
class LossInputs:
    """What the learner computes for a micro-batch of B examples with R continuations each."""

    logps: Tensor
    """(B, R) summed log-probabilities of each continuation under the policy."""
    lengths: Tensor
    """(B, R) tokens in each continuation."""
    ref_logps: Tensor | None = None
    """(B, R) the same under the reference (DPO only)."""


@dataclass(frozen=True)
class Algo:
    """One training algorithm: which continuations of a pair it scores, and its loss."""

    name: str
    continuations: tuple[str, ...]
    """Fields of a `sip.pairs` record scored per example, in order (`suffix` is the original text)."""
    needs_reference: bool
    loss: Callable[[LossInputs, LearnerConfig], LossOutputs]


def _dpo(inputs: LossInputs, cfg: LearnerConfig) -> LossOutputs:
    assert inputs.ref_logps is not None, "DPO needs reference log-probs"
    return dpo_loss(
        inputs.logps[:, 0], inputs.logps[:, 1], inputs.ref_logps[:, 0], inputs.ref_logps[:, 1], cfg.beta,
        nll_mix=cfg.nll_mix, chosen_lengths=inputs.lengths[:, 0],
    )


ALGOS: dict[str, Algo] = {
    "dpo": Algo("dpo", ("chosen", "rejected"), needs_reference=True, loss=_dpo),
    "nll": Algo("nll", ("target",), needs_reference=False,
                loss=lambda inputs, cfg: nll_loss(inputs.logps[:, 0], inputs.lengths[:, 0])),
    "pretrain": Algo("pretrain", ("suffix",), needs_reference=False,
                     loss=lambda inputs, cfg: pretrain_loss(inputs.logps[:, 0], inputs.lengths[:, 0])),
}
