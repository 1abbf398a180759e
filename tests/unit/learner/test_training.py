"""(b) A tiny GPT-2 trains a few steps per algorithm and moves the expected way; (c) a golden loss
curve pinned by seed; and the pieces the step is built from (log-probs, micro-batching, schedule)."""

from __future__ import annotations

import pytest
import torch

from sipstream.config.learner import LearnerConfig
from sipstream.learner.losses import ALGOS
from sipstream.learner.policy import (
    accumulate_gradients,
    build_policy,
    lr_factor,
    optimizer_step,
    step_weight,
)
from sipstream.learner.sequences import (
    Example,
    continuation_texts,
    encode_example,
    sequence_logps,
    split_by_tokens,
)


def examples_for(policy, algo_name: str, pairs: list[dict]) -> list[Example]:
    algo = ALGOS[algo_name]
    return [encode_example(policy.tokenizer, p, continuation_texts(p, algo.continuations), policy.max_seq_tokens)
            for p in pairs]


def train(policy, cfg: LearnerConfig, examples: list[Example], steps: int) -> list[float]:
    """The loop's loss and step phases, `steps` times on the same examples; returns the losses."""
    algo = ALGOS[cfg.algo]
    losses = []
    for _ in range(steps):
        sums = accumulate_gradients(policy, algo, cfg, examples, step_weight(algo, examples))
        optimizer_step(policy, cfg)
        losses.append(sums["loss"] / sums["weight"])
    return losses


def scores(policy, examples: list[Example]) -> torch.Tensor:
    with torch.no_grad():
        logps, _ = sequence_logps(policy.model, examples, policy.tokenizer.pad_token_id, policy.device)
    return logps  # (B, R)


def test_sequence_logps_match_one_row_at_a_time(policy_spec, pairs) -> None:
    policy = build_policy(policy_spec, LearnerConfig(algo="dpo", device="cpu"))
    examples = examples_for(policy, "dpo", pairs[:3])
    batched, lengths = sequence_logps(policy.model, examples, policy.tokenizer.pad_token_id, policy.device)
    for b, example in enumerate(examples):
        for r, (row, n) in enumerate(zip(example.rows, example.continuation_lengths, strict=True)):
            with torch.no_grad():
                logits = policy.model(input_ids=torch.tensor([row])).logits[0]  # (L, vocab), no padding
            token_logps = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, torch.tensor(row[1:]).unsqueeze(-1))
            naive = token_logps.squeeze(-1)[-n:].sum()  # continuation tokens only; the prefix is masked
            assert batched[b, r].item() == pytest.approx(naive.item(), abs=1e-4)
            assert lengths[b, r].item() == n


def test_long_prefix_is_cut_from_the_left(policy_spec, make_pair) -> None:
    policy = build_policy(policy_spec, LearnerConfig(algo="pretrain", device="cpu", max_seq_tokens=16))
    pair = make_pair(0)
    pair["prefix"] = " ".join(f"word{i}" for i in range(200)) + " THE END"
    example = encode_example(policy.tokenizer, pair, [pair["suffix"]], policy.max_seq_tokens)
    (row,), (n,) = example.rows, example.continuation_lengths
    assert len(row) == 16 and n == len(policy.tokenizer.encode(pair["suffix"]))
    assert policy.tokenizer.decode(row[:-n]).endswith("THE END")
    assert policy.tokenizer.decode(row[-n:]) == pair["suffix"]


def test_split_by_tokens_respects_the_budget() -> None:
    examples = [Example(str(i), ((1,) * (10 + i), (1,) * 5), (3, 3)) for i in range(6)]
    groups = split_by_tokens(examples, batch_tokens=60)
    assert [e for g in groups for e in g] == examples  # order kept, nothing lost
    assert all(len(g) == 1 or 2 * len(g) * max(len(r) for e in g for r in e.rows) <= 60 for g in groups)
    assert split_by_tokens(examples, None) == [examples]
    assert split_by_tokens(examples[:1], batch_tokens=16) == [examples[:1]]  # too big alone: its own pass


def test_dpo_increases_the_chosen_over_rejected_margin(policy_spec, pairs) -> None:
    cfg = LearnerConfig(algo="dpo", device="cpu", lr=1e-3, beta=0.1, batch_pairs=4)
    policy = build_policy(policy_spec, cfg)
    examples = examples_for(policy, "dpo", pairs)
    before = scores(policy, examples)
    losses = train(policy, cfg, examples, steps=4)
    after = scores(policy, examples)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step: log 2
    assert losses[-1] < losses[0]
    margin_before = (before[:, 0] - before[:, 1]).mean()
    margin_after = (after[:, 0] - after[:, 1]).mean()
    assert margin_after > margin_before + 1.0
    # The reference stays the initial policy.
    reference = scores(type("P", (), {"model": policy.reference, "tokenizer": policy.tokenizer, "device": policy.device}),
                       examples)
    assert torch.allclose(reference, before, atol=1e-5)


@pytest.mark.parametrize("algo", ["nll", "pretrain"])
def test_nll_and_pretrain_lower_the_target_nll(policy_spec, pairs, algo) -> None:
    cfg = LearnerConfig(algo=algo, device="cpu", lr=1e-3)
    policy = build_policy(policy_spec, cfg)
    examples = examples_for(policy, algo, pairs)
    lengths = torch.tensor([e.continuation_lengths[0] for e in examples], dtype=torch.float32)
    before = -(scores(policy, examples)[:, 0].sum() / lengths.sum())
    losses = train(policy, cfg, examples, steps=3)
    after = -(scores(policy, examples)[:, 0].sum() / lengths.sum())
    assert losses[0] == pytest.approx(before.item(), rel=1e-4)  # the loss is the token-mean NLL
    assert after < before - 0.5


def test_micro_batching_does_not_change_the_update(policy_spec, pairs) -> None:
    """One pass of 8, or 4 passes of 2 (grad_accum) split further by a token budget: the same step."""
    results = []
    for batch_pairs, batch_tokens in [(8, None), (2, 40)]:
        cfg = LearnerConfig(algo="dpo", device="cpu", lr=1e-3, batch_pairs=batch_pairs, batch_tokens=batch_tokens)
        policy = build_policy(policy_spec, cfg)
        examples = examples_for(policy, "dpo", pairs)
        train(policy, cfg, examples, steps=2)
        results.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_golden_loss_curve_is_pinned_by_seed(policy_spec, pairs) -> None:
    """Deterministic on CPU: the same seed, model and pairs give this loss curve (regenerate it
    deliberately if the model, tokenizer or loss changes)."""
    curves = {}
    for algo in ("dpo", "pretrain"):
        torch.manual_seed(0)
        cfg = LearnerConfig(algo=algo, device="cpu", lr=1e-3, warmup_steps=1, total_steps=6, batch_pairs=4)
        policy = build_policy(policy_spec, cfg)
        curves[algo] = train(policy, cfg, examples_for(policy, algo, pairs), steps=6)
    assert curves["dpo"] == pytest.approx(GOLDEN["dpo"], rel=1e-4)
    assert curves["pretrain"] == pytest.approx(GOLDEN["pretrain"], rel=1e-4)


GOLDEN = {
    "dpo": [0.6931472, 0.4776443, 0.3150422, 0.2458184, 0.214046, 0.1988697],
    "pretrain": [10.81038, 10.44285, 10.09317, 9.880309, 9.75433, 9.692737],
}


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = LearnerConfig(lr=1.0, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(3, cfg) == pytest.approx(1.0)
    assert lr_factor(8, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(13, cfg) == pytest.approx(0.1) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(10_000, LearnerConfig(warmup_steps=2)) == 1.0  # endless stream: constant after warm-up


@pytest.mark.parametrize("algo", ["dpo", "nll"])
def test_gradient_checkpointing_gives_the_same_step(policy_spec, pairs, algo) -> None:
    # Checkpointing recomputes activations in backward; loss, gradients and the updated weights must not change.
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = LearnerConfig(algo=algo, device="cpu", lr=1e-3, gradient_checkpointing=checkpointing)
        policy = build_policy(policy_spec, cfg)
        assert policy.model.is_gradient_checkpointing == checkpointing
        examples = examples_for(policy, algo, pairs[:4])
        sums = accumulate_gradients(policy, ALGOS[algo], cfg, examples, step_weight(ALGOS[algo], examples))
        grad_norm = optimizer_step(policy, cfg)
        results.append((sums["loss"], grad_norm, scores(policy, examples)))
    (loss_a, norm_a, after_a), (loss_b, norm_b, after_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert norm_b == pytest.approx(norm_a, rel=1e-4)
    assert torch.allclose(after_a, after_b, atol=1e-5)
