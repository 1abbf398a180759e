"""The policy the learner trains and one optimizer step on it: build, loss over micro-batches, clip and update.

    build_policy → per step: accumulate_gradients (forward + backward per micro-batch) → optimizer_step

`torch` and `transformers` are imported inside the functions that need them (importing this module is cheap).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any

from sipstream.config.learner import LearnerConfig
from sipstream.errors import UserError
from sipstream.learner.distributed import DistInfo, main_rank_first, wrap_model
from sipstream.learner.losses import ALGOS, Algo, LossInputs
from sipstream.learner.sequences import Example, sequence_logps, split_by_tokens

SINGLE_PROCESS = DistInfo()

# --------------------------------------------------------------------------- the policy and its optimizer


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of `lr` for optimizer step `step` (0-based): linear warm-up, then cosine to the floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.total_steps is None:
        return 1.0
    if step >= cfg.total_steps:
        return cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr_ratio)


@dataclass
class Policy:
    """The trained model with what trains it."""

    tokenizer: Any
    """The `HFModel` wrapper: tokenization identical to the rollout workers'."""
    model: Any
    """The trained module (unwrapped; what is published and checkpointed)."""
    train_model: Any
    """`model`, or its DDP wrapper under torchrun."""
    reference: Any | None
    optimizer: Any
    scheduler: Any
    device: Any
    bf16: bool
    max_seq_tokens: int

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def resolve_device(cfg: LearnerConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("learner.device is 'cuda' but no GPU is visible; set learner.device=auto or cpu")
    return cfg.device


def enable_gradient_checkpointing(model: Any) -> None:
    """transformers recomputes layers only in training mode, so switch to it with every dropout set to
    zero: the forward pass stays the deterministic eval-mode one (policy and reference comparable)."""
    import torch

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def build_policy(policy_spec: Any, cfg: LearnerConfig, dist: DistInfo = SINGLE_PROCESS) -> Policy:
    """Load the policy (float32 master weights), a frozen copy as DPO reference, AdamW and its schedule."""

    import torch

    from sipstream.models.hf import HFModel

    device_type = resolve_device(cfg)
    device = torch.device(f"cuda:{dist.local_rank}" if device_type == "cuda" else "cpu")
    max_seq_tokens = cfg.max_seq_tokens or policy_spec.max_prompt_tokens
    # Whatever backend serves rollouts, the learner trains the transformers model of the same source.
    spec = policy_spec.model_copy(update={"backend": "hf", "device": device_type, "dtype": "float32",
                                          "max_prompt_tokens": max_seq_tokens})
    with main_rank_first(dist):  # the first rank to load a model may build it in the shared cache
        hf = HFModel(spec)
    model = hf.model.to(device)
    # Dropout off (TRL's disable_dropout default): policy and reference log-probs are then comparable,
    # and a step is a deterministic function of its batch.
    model.eval()
    model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = None
    if ALGOS[cfg.algo].needs_reference:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    # fused: one pass over each parameter tensor per step. torch's default on CPU makes about eight
    # elementwise passes over all the weights with full-size temporaries (benchmarks/results/learner_vs_bare.md).
    # A checkpoint keeps the flag: runs resumed from older checkpoints continue unfused, bit for bit.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  fused=device_type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and device_type == "cuda")
    return Policy(hf, model, wrap_model(model, dist, device_type), reference, optimizer, scheduler, device, bf16,
                  max_seq_tokens)


# --------------------------------------------------------------------------- loss and step


def step_weight(algo: Algo, examples: list[Example]) -> float:
    """What a step's loss is averaged over, known before any forward pass: pairs (DPO) or target tokens."""
    if algo.name == "dpo":
        return float(len(examples))
    return float(sum(max(e.continuation_lengths[0], 0) for e in examples)) or 1.0


def micro_batches(examples: list[Example], cfg: LearnerConfig) -> list[list[Example]]:
    """`batch_pairs` pairs per pass, split further where a pass would exceed `batch_tokens`."""
    passes: list[list[Example]] = []
    for start in range(0, len(examples), cfg.batch_pairs):
        passes.extend(split_by_tokens(examples[start:start + cfg.batch_pairs], cfg.batch_tokens))
    return passes


def accumulate_gradients(
    policy: Policy, algo: Algo, cfg: LearnerConfig, examples: list[Example], weight: float, dist: DistInfo = SINGLE_PROCESS
) -> dict[str, float]:
    """Forward and backward every micro-batch of this rank's share of the step; returns metric sums."""
    import torch

    pad_id = policy.tokenizer.pad_token_id
    passes = micro_batches(examples, cfg)
    # DDP averages gradients over ranks; scaling by world_size / global weight makes that average the
    # single-process mean loss of the whole step.
    scale = dist.world_size / weight
    sums: dict[str, Any] = {}
    for index, group in enumerate(passes):
        # Under DDP only the step's last backward all-reduces gradients.
        last = index == len(passes) - 1
        sync = contextlib.nullcontext() if last or not dist.enabled else policy.train_model.no_sync()
        with sync:
            with policy.autocast():
                logps, lengths = sequence_logps(policy.train_model, group, pad_id, policy.device)  # (B, R)
                ref_logps = None
                if algo.needs_reference:
                    with torch.no_grad():
                        ref_logps, _ = sequence_logps(policy.reference, group, pad_id, policy.device)
            out = algo.loss(LossInputs(logps, lengths, ref_logps), cfg)
            (out.losses.sum() * scale).backward()
        for name, value in {"loss": out.losses.detach(), "weight": out.weights, **out.metrics}.items():
            sums[name] = sums.get(name, 0.0) + value.sum()
        sums["pairs"] = sums.get("pairs", 0) + len(group)
        sums["tokens"] = sums.get("tokens", 0) + sum(e.tokens for e in group)
    if not passes and dist.enabled:
        # A rank with no share (a short final step) must still join the gradient all-reduce, and DDP
        # all-reduces only in a backward through its own forward: one token's logits times zero.
        with policy.autocast():
            logits = policy.train_model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=policy.device)).logits
        (logits.sum() * 0.0).backward()
    # .item() is a sync point on GPU: once per step, not per micro-batch.
    return {name: float(value) for name, value in sums.items()}


def optimizer_step(policy: Policy, cfg: LearnerConfig) -> float:
    """Clip, update, advance the schedule; returns the gradient norm before clipping."""
    import torch

    params = [p for p in policy.model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    policy.optimizer.step()
    policy.scheduler.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)

