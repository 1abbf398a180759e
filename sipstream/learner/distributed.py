"""Data-parallel training with torchrun (DDP). Untouched unless torchrun launched the process.

    torchrun --nproc_per_node=8 -m sipstream.learner --bootstrap kafka:9092 --config run.yaml

How the ranks share the work:
- **rank 0 owns the bus**: it alone consumes `sip.pairs` (one logical consumer keeps the exact-resume
  bookkeeping — offsets, dedupe — in one place), and it alone publishes weights, writes checkpoints and
  commits offsets. Each step it broadcasts the step's examples (token ids, small) and the stop flag.
- **every rank trains on its shard** of the step (`examples[rank::world_size]`) under
  `DistributedDataParallel`, which averages gradients across ranks in the last backward of the step
  (the earlier micro-batches run under `no_sync()`). Each rank scales its loss by
  `world_size / global step weight`, so the averaged gradient equals the single-process one.
- **resume**: every rank loads the same latest checkpoint (the checkpoint folder must be on a shared
  filesystem, as it is on one node), so optimizer states stay identical across ranks.

The backend is NCCL on GPUs and gloo on CPU (the CPU path is what can be tried without GPUs:
`torchrun --nproc_per_node=2` on a laptop). A process torchrun launched joins the group even alone
(`--nproc_per_node=1`: DDP of one, what the GPU check runs with NCCL); a plain process never does.

Faults: every collective waits at most `learner.dist_timeout_s`, then raises, so no rank hangs on a
dead or stuck peer (a killed peer's closed sockets usually fail the collective at once; torchrun then
stops the other ranks). Rank 0's wait for pairs is unbounded, so while it waits it broadcasts a
keep-alive every quarter of the timeout (`StepChannel`). Nothing is recorded for a step that did not
complete: a restart resumes from the last checkpoint, as after a single-process crash.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    """In a torch.distributed process group (launched by torchrun, one process included)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout_s: float) -> DistInfo:
    """Join the torchrun process group (every collective fails after `timeout_s` instead of hanging);
    a process torchrun did not launch gets DistInfo() and no group."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    import torch
    import torch.distributed as torch_dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                      timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), local_rank=local_rank,
                    enabled=True)


MAIN_RANK_FIRST_TIMEOUT = timedelta(hours=2)
"""How long the other ranks wait for rank 0 in `main_rank_first`: a first download of a large model."""


@contextmanager
def main_rank_first(dist: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block alone first, then the other ranks together: for work on a shared cache
    (building or converting a model into `models.*.cache_dir`) that ranks running at once would tear.
    The wait has its own gloo group and timeout: it may take far longer than `learner.dist_timeout_s`."""
    if not dist.enabled:
        yield
        return
    import torch.distributed as torch_dist

    group = torch_dist.new_group(backend="gloo", timeout=MAIN_RANK_FIRST_TIMEOUT)
    if not dist.is_main:
        torch_dist.barrier(group=group)
    try:
        yield
    finally:
        if dist.is_main:
            torch_dist.barrier(group=group)


def wrap_model(model: Any, dist: DistInfo, device_type: str) -> Any:
    """The module to train: DDP-wrapped under torchrun (it broadcasts rank 0's weights), else `model` itself."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False: ranks may make different numbers of forward passes in a step (a short
    # last step, token-budget splits), and a buffer broadcast in each forward would then pair up wrongly.
    # The buffers (causal masks, rotary tables) are built from the config, equal on every rank anyway.
    return DistributedDataParallel(model, device_ids=[dist.local_rank] if device_type == "cuda" else None,
                                   broadcast_buffers=False)


def broadcast_object(value: Any, dist: DistInfo) -> Any:
    """Rank 0's `value` on every rank (a sync point: every rank waits for rank 0)."""
    if not dist.enabled:
        return value
    import torch.distributed as torch_dist

    box = [value if dist.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


WAITING = "rank 0 is still collecting the step"


class StepChannel:
    """Rank 0 → every rank, once per step: the step's input. While rank 0 waits on the bus (unbounded:
    pairs may not come for hours) it sends `WAITING` every quarter of the collective timeout, so the
    other ranks, waiting in the broadcast, never time out on a live rank 0."""

    def __init__(self, dist: DistInfo, timeout_s: float) -> None:
        self.dist, self.interval_s = dist, timeout_s / 4
        self.last_sent = time.monotonic()

    def keepalive(self) -> None:
        """Rank 0, on every poll of the bus: a keep-alive when one is due (a sync point)."""
        if self.dist.enabled and self.dist.is_main and time.monotonic() - self.last_sent >= self.interval_s:
            broadcast_object(WAITING, self.dist)
            self.last_sent = time.monotonic()

    def send(self, value: Any) -> Any:
        """Rank 0 sends `value`; every rank returns it (the others skip keep-alives on the way)."""
        if not self.dist.enabled:
            return value
        if self.dist.is_main:
            broadcast_object(value, self.dist)
            self.last_sent = time.monotonic()
            return value
        while True:
            value = broadcast_object(None, self.dist)
            if not (isinstance(value, str) and value == WAITING):
                return value


def sum_over_ranks(values: dict[str, float], dist: DistInfo) -> dict[str, float]:
    """Per-key sum over ranks of a few step statistics (a sync point). A rank without a share of the
    step has no keys at all; it counts as zeros."""
    if not dist.enabled:
        return values
    import torch.distributed as torch_dist

    every_rank: list[dict[str, float] | None] = [None] * dist.world_size
    torch_dist.all_gather_object(every_rank, values)
    totals: dict[str, float] = {}
    for rank_values in every_rank:
        for name, value in (rank_values or {}).items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def shutdown(dist: DistInfo) -> None:
    if dist.enabled:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
