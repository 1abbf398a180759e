"""(a) Each loss against a hand computation and against a naive per-example reference."""

from __future__ import annotations

import math

import pytest
import torch

from sipstream.config.learner import LearnerConfig
from sipstream.learner.losses import (
    ALGOS,
    LossInputs,
    dpo_loss,
    nll_loss,
    pretrain_loss,
)


def naive_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, nll_mix=0.0, chosen_length=1):
    """One pair, plain floats, straight from the paper's formula."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = -math.log(1.0 / (1.0 + math.exp(-beta * margin)))
    return loss + nll_mix * (-chosen / chosen_length)


def test_dpo_loss_hand_computed() -> None:
    # logratios = -1 - (-3) = 2; ref_logratios = -2 - (-2) = 0; logits = 2; beta 0.5 → -log σ(1)
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.3132616875182228)  # log(1 + e^-1)
    assert out.weights.tolist() == [1.0]
    assert out.metrics["chosen_rewards"].item() == pytest.approx(0.5)  # 0.5 · (-1 - -2)
    assert out.metrics["rejected_rewards"].item() == pytest.approx(-0.5)
    assert out.metrics["reward_margin"].item() == pytest.approx(1.0)
    assert out.metrics["reward_accuracy"].item() == 1.0


def test_dpo_loss_at_reference_is_log2() -> None:
    logps = torch.tensor([-4.0, -7.5])
    out = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)  # policy == reference
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert out.metrics["reward_accuracy"].tolist() == [0.0, 0.0]


def test_dpo_loss_with_nll_mix_hand_computed() -> None:
    # DPO part log(1 + e^-1) as above; NLL part 0.25 · (-(-1) / 4 tokens) = 0.0625
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5,
                   nll_mix=0.25, chosen_lengths=torch.tensor([4.0]))
    assert out.losses.item() == pytest.approx(0.3132616875182228 + 0.0625)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, nll_mix=1.0)


def test_dpo_loss_matches_naive_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    values = [-torch.rand(64, generator=generator, dtype=torch.float64) * 50 for _ in range(4)]
    lengths = torch.randint(1, 30, (64,), generator=generator).double()
    for beta, mix in [(0.1, 0.0), (1.0, 0.0), (0.05, 0.5)]:
        out = dpo_loss(*values, beta=beta, nll_mix=mix, chosen_lengths=lengths)
        expected = [naive_dpo(*(v[i].item() for v in values), beta, mix, lengths[i].item()) for i in range(64)]
        assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1).loss().backward()
    # d/dchosen of -log σ(β(c - r)) at c = r is -β/2: descent raises chosen, lowers rejected.
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


def test_nll_loss_is_token_mean_over_the_batch() -> None:
    # Two targets: 3 tokens summing to -6, 1 token of -2 → mean NLL per token (6 + 2) / 4 = 2
    out = nll_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 1.0]))
    assert out.losses.tolist() == [6.0, 2.0]
    assert out.weights.tolist() == [3.0, 1.0]
    assert out.loss().item() == pytest.approx(2.0)


def test_nll_loss_matches_naive_token_mean() -> None:
    generator = torch.Generator().manual_seed(1)
    token_logps = -torch.rand(8, 12, generator=generator, dtype=torch.float64) * 10  # (B, T)
    mask = (torch.rand(8, 12, generator=generator) > 0.3).double()
    mask[:, 0] = 1
    out = nll_loss((token_logps * mask).sum(-1), mask.sum(-1))
    naive = -sum(token_logps[b, t].item() for b in range(8) for t in range(12) if mask[b, t]) / mask.sum().item()
    assert out.loss().item() == pytest.approx(naive, rel=1e-12)


def test_pretrain_loss_is_nll_on_the_suffix() -> None:
    a = pretrain_loss(torch.tensor([-3.0, -1.0]), torch.tensor([2.0, 2.0]))
    assert a.loss().item() == pytest.approx(1.0)


def test_registry_wires_columns_to_the_loss() -> None:
    cfg = LearnerConfig(algo="dpo", beta=0.5)
    inputs = LossInputs(logps=torch.tensor([[-1.0, -3.0]]), lengths=torch.tensor([[2.0, 5.0]]),
                        ref_logps=torch.tensor([[-2.0, -2.0]]))
    assert ALGOS["dpo"].loss(inputs, cfg).losses.item() == pytest.approx(0.3132616875182228)
    assert ALGOS["dpo"].continuations == ("chosen", "rejected") and ALGOS["dpo"].needs_reference
    nll = ALGOS["nll"].loss(LossInputs(torch.tensor([[-4.0]]), torch.tensor([[2.0]])), LearnerConfig(algo="nll"))
    assert nll.loss().item() == pytest.approx(2.0)
    assert ALGOS["nll"].continuations == ("target",) and ALGOS["pretrain"].continuations == ("suffix",)
    assert set(ALGOS) == {"dpo", "nll", "pretrain"}
