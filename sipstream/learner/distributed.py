"""Data-parallel training with torchrun (DDP). Untouched unless WORLD_SIZE > 1.

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
`torchrun --nproc_per_node=2` on a laptop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; a single process gets DistInfo() and no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    import torch
    import torch.distributed as torch_dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), local_rank=local_rank)


def wrap_model(model: Any, dist: DistInfo, device_type: str) -> Any:
    """The module to train: DDP-wrapped under torchrun (it broadcasts rank 0's weights), else `model` itself."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if device_type == "cuda" else None)


def broadcast_object(value: Any, dist: DistInfo) -> Any:
    """Rank 0's `value` on every rank (a sync point: every rank waits for rank 0)."""
    if not dist.enabled:
        return value
    import torch.distributed as torch_dist

    box = [value if dist.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], dist: DistInfo, device: Any) -> list[float]:
    """Element-wise sum over ranks of a few floats (step statistics)."""
    if not dist.enabled:
        return values
    import torch
    import torch.distributed as torch_dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def shutdown(dist: DistInfo) -> None:
    if dist.enabled:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
