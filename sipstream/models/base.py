"""What a stage needs from a model, whatever serves it.

Every backend (``hf``, ``vllm``, ``openai``) implements :class:`TextModel`. The contract that makes
rollouts reproducible: output ``i`` of :meth:`TextModel.generate` depends only on ``prompts[i]`` and
``seeds[i]`` (and the weights), never on what else shares the batch, so a batch of 8 equals 8 calls
of one. This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class ModelError(Exception):
    """Base class for errors of the model layer."""


class ModelNotAvailableError(ModelError):
    """A model (or the package shipping it) is missing; the message says how to get it."""


class WeightsMismatchError(ModelError):
    """New weights were refused (wrong sha256 or shapes); the model keeps its current weights."""


class TokenizerUnavailableError(ModelError):
    """The backend has no local tokenizer (an ``openai`` model without ``tokenizer`` set)."""


class BackendRequestError(ModelError):
    """A remote model server failed or kept failing after retries."""


@runtime_checkable
class TextModel(Protocol):
    """The small protocol the stages use: sample, score, count tokens, reload weights."""

    #: Bumped by every successful :meth:`load_weights`; rollouts are tagged with it.
    weights_version: str | None

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        seeds: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Sample one continuation per prompt. ``temperature=0`` is greedy. Output ``i`` depends
        only on ``prompts[i]`` and ``seeds[i]``; generation stops early at end-of-sequence."""
        ...

    def logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """Sum of the log-probabilities of ``continuations[i]``'s tokens given ``prompts[i]``."""
        ...

    def next_token_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        """For each prompt, the log-probability of each option's first distinguishing token: the
        tokens all options share (Gemma writes " 1" and " 2" as "▁" + digit) are appended to the
        prompt, and the next token is read (``-inf`` when a remote server does not report it). One
        forward pass per prompt: this is how the logit-scored judge reads P(YES) or P("1")."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``, special tokens dropped."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens in ``text`` (without special tokens)."""
        ...

    def load_weights(self, path_or_uri: str, sha256: str, version: str | None = None) -> None:
        """Replace the weights in place from a safetensors file (local path or fsspec URI) after
        checking its sha256; on any mismatch raise :class:`WeightsMismatchError` and keep the
        current weights."""
        ...


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a local file, read in blocks so multi-GB checkpoints do not sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_size):
            digest.update(block)
    return digest.hexdigest()


#: safetensors header cap (the format's own parser refuses more than 100 MB).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def safetensors_problem(head: bytes, total_size: int) -> str | None:
    """Why a file is not a complete safetensors file (None when it is), from its first bytes and size.

    Weights arrive by announcement on the bus, so only safetensors are ever parsed (never pickle, which
    runs code on load). This check refuses a pickle, a truncated file or any other bytes before a parser
    sees them: an 8-byte little-endian header length, a JSON object header, and tensor data offsets that
    end exactly at the end of the file. `head` must hold at least the header (all bytes is fine)."""
    if total_size < 8 or len(head) < 8:
        return f"{total_size} bytes: too short for a safetensors header"
    (header_size,) = struct.unpack("<Q", head[:8])
    if header_size > _MAX_SAFETENSORS_HEADER or 8 + header_size > total_size:
        return f"header length {header_size} does not fit a {total_size}-byte file (not safetensors, or truncated)"
    if len(head) < 8 + header_size:
        return None if header_size == 0 else "header not read"
    try:
        header = json.loads(head[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"header is not JSON ({error}): not a safetensors file"
    if not isinstance(header, dict):
        return "header is not a JSON object: not a safetensors file"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {name!r} has no valid data_offsets: not a safetensors file"
        ends.append(offsets[1])
    data_size = total_size - 8 - header_size
    if max(ends, default=0) != data_size:
        return f"tensor data needs {max(ends, default=0)} bytes, the file holds {data_size} (truncated or padded)"
    return None


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_views(data: bytes) -> dict[str, Any]:
    """The tensors of a safetensors file held in ``data`` as read-only views on those bytes, no copy.

    The safetensors parser copies every tensor it reads, so a reload briefly held the file twice (for a
    135M policy in float32: +540 MB of peak memory per reload). Callers copy the views into their own
    parameters and drop ``data``. Call it on bytes that passed :func:`safetensors_problem`; every
    tensor's byte range is checked against its dtype and shape here too."""

    import torch

    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    base = 8 + header_size
    buffer = memoryview(data)
    views: dict[str, Any] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype_name = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype_name is None:
            raise WeightsMismatchError(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        dtype = getattr(torch, dtype_name)
        shape = [int(size) for size in entry.get("shape", [])]
        start, end = entry["data_offsets"]
        count = math.prod(shape)
        if not 0 <= start <= end or end - start != count * dtype.itemsize:
            raise WeightsMismatchError(f"tensor {name!r}: {end - start} bytes do not hold {dtype_name} {shape}")
        if count == 0:
            views[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():  # the bytes are read-only; the views are only ever read
            warnings.simplefilter("ignore", UserWarning)
            views[name] = torch.frombuffer(buffer[base + start : base + end], dtype=dtype).view(shape)
    return views


def _require_safetensors(head: bytes, total_size: int, path_or_uri: str) -> None:
    problem = safetensors_problem(head, total_size)
    if problem is not None:
        raise WeightsMismatchError(f"refusing weights {path_or_uri}: {problem}")


def read_verified_weights(path_or_uri: str, sha256: str, scratch_dir: str | Path | None = None) -> bytes:
    """The bytes of a weights file whose sha256 matches and that is a complete safetensors file, read once.

    Reading into memory and hashing those bytes costs one pass over the file instead of two (hash,
    then load), which halves the reload time of a CPU policy; `safetensors.torch.load` parses them.
    """
    if "://" in path_or_uri and not path_or_uri.startswith("file://"):
        path = fetch_weights_file(path_or_uri, sha256, scratch_dir)  # remote: copied and checked once
        return path.read_bytes()
    local_path = Path(path_or_uri.removeprefix("file://"))
    if not local_path.is_file():
        raise WeightsMismatchError(f"weights file not found: {path_or_uri}")
    data = local_path.read_bytes()
    actual_sha256 = hashlib.sha256(data).hexdigest()
    if actual_sha256 != sha256:
        raise WeightsMismatchError(
            f"refusing weights {path_or_uri}: sha256 is {actual_sha256}, the announcement says {sha256}"
        )
    _require_safetensors(data, len(data), path_or_uri)
    return data


def fetch_weights_file(path_or_uri: str, sha256: str, scratch_dir: str | Path | None = None) -> Path:
    """Return a local path to the weights named by ``path_or_uri`` whose sha256 matches.

    Local paths and ``file://`` are used in place; any other fsspec URI (``s3://`` ...) is copied
    into ``scratch_dir`` first. The checks (sha256, then the safetensors layout) happen before any
    tensor is read, so a truncated, tampered or pickled file never reaches the model.
    """
    if "://" in path_or_uri and not path_or_uri.startswith("file://"):

        import fsspec

        target_dir = Path(scratch_dir or tempfile.mkdtemp(prefix="sipstream-weights-"))
        target_dir.mkdir(parents=True, exist_ok=True)
        local_path = target_dir / f"{sha256[:16]}.safetensors"
        if not local_path.exists():
            with fsspec.open(path_or_uri, "rb") as source, open(local_path, "wb") as target:
                while block := source.read(1 << 20):
                    target.write(block)
    else:
        local_path = Path(path_or_uri.removeprefix("file://"))
    if not local_path.is_file():
        raise WeightsMismatchError(f"weights file not found: {path_or_uri}")
    actual_sha256 = sha256_file(local_path)
    if actual_sha256 != sha256:
        raise WeightsMismatchError(
            f"refusing weights {path_or_uri}: sha256 is {actual_sha256}, the announcement says {sha256}"
        )
    with open(local_path, "rb") as file:
        head = file.read(8)
        if len(head) == 8:
            head += file.read(min(struct.unpack("<Q", head)[0], _MAX_SAFETENSORS_HEADER))
    _require_safetensors(head, local_path.stat().st_size, path_or_uri)
    return local_path


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from an item's seed and labels (criterion, candidate, sample index).

    Python's ``hash`` is salted per process, so it cannot make a replay reproduce a rollout.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def distinguishing_tokens(option_token_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(shared, firsts): the token ids every option starts with, and each option's next token.

    Raises ValueError when an option has no token after the shared ones (options that are equal,
    or one a token-prefix of another), since their probabilities could not be told apart."""
    if not option_token_ids or any(not ids for ids in option_token_ids):
        raise ValueError("every option must encode to at least one token")
    shared: list[int] = []
    for column in zip(*option_token_ids, strict=False):  # options differ in length: the shared head is the shorter
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    if any(len(ids) <= len(shared) for ids in option_token_ids):
        raise ValueError("options must differ after their shared tokens")
    return shared, [ids[len(shared)] for ids in option_token_ids]
