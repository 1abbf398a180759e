"""Atomic learner checkpoints: everything needed to continue as if never stopped.

    <dir>/step-00000012/
        model.safetensors      policy tensors (tied ones once)
        reference.safetensors  only when the reference is refreshed (else it is the initial policy)
        trainer.pt             optimizer, scheduler and RNG states (tensors and plain data: loaded with
                               weights_only=True, so a checkpoint cannot run code)
        state.json             step, policy version, next offset per partition, seen item ids, counters

A checkpoint is written into a temporary folder and renamed into place, so a folder named
`step-*` is always complete; the newest one is the latest checkpoint. A kill at any moment leaves
either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LearnerState:
    """What the loop tracks besides tensors; checkpointed as JSON."""

    step: int = 0
    version: int = 0
    """Policy version of the last publication (0: the initial policy rollout workers start from)."""
    published_step: int = 0
    """Optimizer step of the last publication."""
    positions: dict[int, int] = field(default_factory=dict)
    """Next offset to read per partition of sip.pairs: everything before it is trained or skipped."""
    seen_ids: list[str] = field(default_factory=list)
    """Item ids trained in this run, oldest first (the dedupe window)."""
    counters: dict[str, float] = field(default_factory=dict)
    config_hash: str = ""
    log_lines: int = 0
    """Lines of the consumption log this checkpoint covers; a resume cuts the log back to them."""

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "positions": {str(p): o for p, o in self.positions.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LearnerState:
        return cls(**{**data, "positions": {int(p): int(o) for p, o in data["positions"].items()}})


def rng_state() -> dict[str, Any]:
    import torch

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _step_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def save_checkpoint(
    directory: Path,
    state: LearnerState,
    model_tensors: dict[str, Any],
    trainer_state: dict[str, Any],
    reference_tensors: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{state.step:08d}"
    scratch = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    save_file(model_tensors, str(scratch / "model.safetensors"))
    if reference_tensors is not None:
        save_file(reference_tensors, str(scratch / "reference.safetensors"))
    torch.save({**trainer_state, "rng": rng_state()}, scratch / "trainer.pt")
    (scratch / "state.json").write_text(json.dumps(state.to_json()))
    for path in scratch.iterdir():  # data on disk before the rename makes it visible
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if final.exists():  # a re-run of the same step after a crash: same content, replace it
        shutil.rmtree(final)
    os.rename(scratch, final)
    for old in _step_dirs(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    state: LearnerState
    model_tensors: dict[str, Any]
    trainer_state: dict[str, Any]
    reference_tensors: dict[str, Any] | None


def load_latest(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None. Leftover temporary folders of a killed writer are removed."""
    import torch
    from safetensors.torch import load_file

    if not directory.is_dir():
        return None
    for leftover in directory.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    dirs = _step_dirs(directory)
    if not dirs:
        return None
    path = dirs[-1]
    reference = path / "reference.safetensors"
    return Checkpoint(
        path=path,
        state=LearnerState.from_json(json.loads((path / "state.json").read_text())),
        model_tensors=load_file(str(path / "model.safetensors")),
        trainer_state=torch.load(path / "trainer.pt", weights_only=True),
        reference_tensors=load_file(str(reference)) if reference.exists() else None,
    )
