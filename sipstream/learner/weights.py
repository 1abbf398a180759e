"""Publishing policy weights to the weight store (fsspec: `file://`, `s3://`, ...).

A publication is a safetensors file of the model's state_dict (tied tensors saved once, the form
`HFModel.load_weights` accepts) plus a small JSON sidecar, written under `<root>/<run_name>/`:

    v00000012.safetensors   the tensors
    v00000012.json          {version, step, sha256, algo, config_hash, uri, created_at}

The file is complete before it is visible: on a local store it is written under a temporary name and
renamed; an object store makes a single PUT visible atomically. Only then is it announced on
`sip.weights`, so a reader never sees a half-written file under an announced name (and checks the
sha256 anyway).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sipstream.models.base import sha256_file

if TYPE_CHECKING:
    import torch


def unique_state_dict(model: Any, dtype: Any = None) -> dict[str, torch.Tensor]:
    """The model's tensors on CPU (cast to `dtype` if given), each storage once (GPT-2's lm_head shares
    the embedding: the first name in state_dict order is kept, which `HFModel.load_weights` restores
    the tie from)."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        tensor = tensor.detach().to("cpu")
        tensors[name] = (tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)).contiguous()
    return tensors


def load_state_into(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model` in place; a key may be missing only where it shares storage with one present."""
    import torch

    current = model.state_dict()
    groups: dict[int, set[str]] = {}
    for name, tensor in current.items():
        groups.setdefault(tensor.data_ptr(), set()).add(name)
    unknown = sorted(set(tensors) - set(current))
    missing = [n for n in current if n not in tensors and not (groups[current[n].data_ptr()] & tensors.keys())]
    if unknown or missing:
        raise ValueError(f"state does not fit the model: unknown {unknown[:5]}, missing {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            current[name].copy_(tensor.to(current[name].device, current[name].dtype))


def config_hash(data: Any) -> str:
    """A short stable hash of a JSON-able config (recorded with every publication and checkpoint)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Publication:
    version: int
    step: int
    uri: str
    sha256: str
    created_at: str


class WeightStore:
    """Writes versioned weight files under an fsspec root."""

    def __init__(self, root: str, run_name: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.base = base.rstrip("/") + "/" + run_name
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.fs.makedirs(self.base, exist_ok=True)

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def publish(self, tensors: dict[str, torch.Tensor], version: int, step: int, meta: dict[str, Any]) -> Publication:
        from safetensors.torch import save_file

        name = f"{self.base}/v{version:08d}"
        with tempfile.TemporaryDirectory(prefix="sipstream-publish-") as scratch:
            # A local store is written in place under a temporary name (no extra copy of a
            # multi-GB file); a remote one is staged in scratch and uploaded in one PUT.
            staged = f"{name}.safetensors.partial-{os.getpid()}" if self.local else str(Path(scratch) / "w.safetensors")
            save_file(tensors, staged)  # no metadata: equal tensors give equal bytes and sha256
            digest = sha256_file(staged)  # reads back from the page cache
            publication = Publication(version, step, self.uri(name + ".safetensors"), digest,
                                      dt.datetime.now(dt.UTC).isoformat())
            if self.local:
                os.replace(staged, name + ".safetensors")  # atomic on one filesystem
            else:
                self.fs.put_file(staged, name + ".safetensors")  # one PUT: visible whole or not at all
            sidecar = Path(scratch) / "sidecar.json"
            sidecar.write_text(json.dumps({**publication.__dict__, **meta}, indent=1))
            self._put(sidecar, name + ".json")
        return publication

    def _put(self, local: Path, path: str) -> None:
        if self.local:
            partial = f"{path}.partial-{os.getpid()}"
            self.fs.put_file(str(local), partial)
            os.replace(partial, path)
        else:
            self.fs.put_file(str(local), path)
