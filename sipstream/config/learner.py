"""The learner's configuration (`cfg.learner`): validated data, one docstring per field.

Importing this module needs only pydantic, so `sipstream.config` can embed it without pulling torch.

Batch shapes, from small to large:
- a **micro-batch** is one forward/backward pass: at most `batch_pairs` pairs and at most
  `batch_tokens` padded tokens (every sequence counted; a DPO pair is two sequences);
- an **optimizer step** accumulates the gradients of `grad_accum` micro-batches (the step's pairs
  are consumed first, so the loss is normalised over the whole step whatever the split);
- **publication** happens every `sync_every` optimizer steps (1 = fully online).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LearnerConfig(BaseModel):
    """Training: which loss, how batches are built, how often weights are published and checkpointed."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # --- the loss ---
    algo: Literal["dpo", "nll", "pretrain"] = "dpo"
    """Online DPO, reward-filtered NLL, or the plain next-token baseline."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature: how far the policy may move from the reference (TRL's default, 0.1)."""
    nll_mix: float = Field(0.0, ge=0)
    """DPO only: add this λ times the length-normalised NLL of the chosen continuation (0 = pure DPO)."""
    reference_refresh_every: int | None = Field(None, ge=1)
    """DPO only: copy the policy into the reference every this many optimizer steps (unset: the reference
    stays the initial policy, as in the paper)."""

    # --- batches ---
    batch_pairs: int = Field(8, ge=1)
    """Most pairs in one micro-batch (one forward/backward pass)."""
    batch_tokens: int | None = Field(None, ge=16)
    """Token budget of one micro-batch, padding included (unset: only `batch_pairs` limits it)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches whose gradients are summed into one optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: about a third
    more compute for a fraction of the activation memory (the CPU default turns it on to fit 8 GiB)."""
    max_seq_tokens: int | None = Field(None, ge=2)
    """Prefix + continuation at most this many tokens, the prefix cut from the left (unset: the policy's
    `models.policy.max_prompt_tokens`)."""

    # --- the optimizer ---
    lr: float = Field(1e-6, gt=0)
    """Peak learning rate of AdamW (the online-DPO recipe uses ~1e-6 for 1B-scale models)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    total_steps: int | None = Field(None, ge=1)
    """Cosine decay from `lr` to `min_lr_ratio`·`lr` ends here (unset: constant after warm-up, for an endless stream)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Floor of the cosine schedule as a fraction of `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this (unset: no clipping)."""

    # --- staleness and stopping ---
    sync_every: int = Field(1, ge=1)
    """Publish weights every this many optimizer steps (1 = fully online; the semi-online knob)."""
    max_policy_lag: int = Field(4, ge=0)
    """Pairs whose rollouts came from a policy more than this many versions older than the learner's are stale."""
    stale_pairs: Literal["drop", "count"] = "drop"
    """`drop`: stale pairs are skipped (and counted); `count`: they are trained on and only counted."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps in total, resumed ones included (unset: run forever)."""
    idle_timeout_s: float | None = Field(None, gt=0)
    """Stop when no pair arrives for this long, after training what is in hand (unset: never)."""
    poll_timeout_s: float = Field(0.5, gt=0)
    """Longest single wait on the broker; bounds how late SIGTERM and the idle check are noticed."""

    # --- publication and checkpoints ---
    weight_store: str | None = None
    """fsspec URI root for published weights (`file:///...`, `s3://bucket/prefix`); unset:
    `file://<run_dir>/<run_name>/weights`."""
    weight_store_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """fsspec storage options for `weight_store` (e.g. `endpoint_url` for MinIO); credentials belong in the
    environment (AWS_*), not here."""
    publish_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of published weights. `bfloat16` halves the file and the reload time (workers cast to their own
    dtype); checkpoints always keep float32."""
    checkpoint_every: int = Field(10, ge=1)
    """Checkpoint every this many optimizer steps; Kafka offsets are committed only after a checkpoint."""
    checkpoint_dir: Path | None = None
    """Where checkpoints go (unset: `<run_dir>/<run_name>/learner`). A restart resumes from the latest one."""
    keep_checkpoints: int = Field(2, ge=1)
    """Older checkpoints beyond this many are deleted."""

    # --- hardware ---
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when visible, else CPU."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute precision. Weights and optimizer state stay float32; `bfloat16` autocasts the forward pass
    (`auto`: bfloat16 on CUDA, float32 on CPU, where bf16 matmuls are slow)."""
    dist_timeout_s: float = Field(600.0, gt=0)
    """Under torchrun: longest wait of one rank in a collective (the step's broadcast, the gradient
    all-reduce) before it fails instead of hanging on a dead or stuck peer. The other ranks wait while
    rank 0 publishes and checkpoints, so it must exceed those; while rank 0 waits for pairs it sends
    keep-alives every quarter of it."""
    dedupe_capacity: int = Field(1_000_000, ge=1)
    """Item ids remembered to train no item twice within a run (checkpointed with the offsets)."""

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if self.nll_mix > 0 and self.algo != "dpo":
            raise ValueError(f"nll_mix mixes NLL into DPO; it has no meaning with algo={self.algo!r} (set it to 0)")
        if self.reference_refresh_every is not None and self.algo != "dpo":
            raise ValueError(f"reference_refresh_every needs algo='dpo' (no reference model with algo={self.algo!r})")
        if self.total_steps is not None and self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than total_steps ({self.total_steps})")
        if self.device == "cpu" and self.precision == "bfloat16":
            raise ValueError("precision 'bfloat16' needs device 'cuda' (or 'auto' on a GPU machine); use float32 on CPU")
        if self.batch_tokens is not None and self.max_seq_tokens is not None:
            rows = 2 if self.algo == "dpo" else 1
            if self.batch_tokens < rows * self.max_seq_tokens:
                raise ValueError(
                    f"batch_tokens ({self.batch_tokens}) cannot hold one {self.algo} example of max_seq_tokens "
                    f"({self.max_seq_tokens}) × {rows} sequence(s)"
                )
        return self
