"""Run manifests: what a run was made of, so it can be audited and replayed.

Every learner run and every `sipstream run` writes `manifest.json` in its run directory:

    kind            "learner" or "pipeline"
    config          the full resolved config (file < env < --set), as the run used it
    code            code version: git describe and commit of the checkout, else the package version
    seeds           the root seed (every item derives its own; the learner seeds torch and random with it)
    bus             bootstrap servers and topic prefix the run talked to
    topics          per topic (spec name): live name, role (consumed / produced) and the offset range
                    per partition, as [first, last + 1]; a pipeline run also names, per topic, the
                    stages that produced it and those that consumed it (`produced_by`, `consumed_by`)
    models          (learner) policy source, sha256 of its initial weights and of its tokenizer;
                    (pipeline) each model's source and the sha256 of the files it resolves to here
    archive         (pipeline) where the run archived its topics when its broker was in memory
                    (`bus.ephemeral`: the broker, and every record on it, ended with the run)
    threads         (pipeline) the learner's torch/OpenMP thread count: CPU float sums depend on it,
                    so a bit-identical replay uses the same
    learner         (learner) algo, steps, final weights (version, step, sha256, uri), counters and the
                    consumption log (which records each step trained on, see learner/consumption.py)

A manifest is rewritten atomically (temporary file + rename), so a reader never sees half of one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

import sipstream
from sipstream.bus import topics as T
from sipstream.bus.client import consumer_config
from sipstream.config import project_root
from sipstream.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = 1


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def code_version() -> dict[str, Any]:
    """git describe + commit of the source checkout when there is one, and the package version."""

    out: dict[str, Any] = {"package": sipstream.__version__}
    root = project_root()
    if (root / ".git").exists():
        def git(*args: str) -> str | None:
            try:
                done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                      check=False)
            except (OSError, subprocess.TimeoutExpired):
                return None
            return done.stdout.strip() if done.returncode == 0 else None

        out["git_describe"] = git("describe", "--always", "--dirty", "--tags")
        out["git_commit"] = git("rev-parse", "HEAD")
    return out


def tensors_sha256(tensors: dict[str, Any]) -> str:
    """A hash of named tensors (name, dtype, shape, bytes; in name order), without serialising a file.

    Not the sha256 of a safetensors file (that is what publications record); stable across runs and
    machines for equal tensors."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """A hash of what decides token ids: the tokenizer class, its vocabulary and special tokens."""
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a temporary file, fsync'd, renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(scratch, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1, default=str)
        file.flush()
        os.fsync(file.fileno())
    os.replace(scratch, path)


def load_manifest(run: str | Path) -> tuple[Path, dict[str, Any]]:
    """(run directory, manifest) of a run directory or a manifest file; one-line errors."""
    path = Path(run)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in {run}: pass a run directory written by `sipstream learner` "
                        "or `sipstream run` (runs before replay support have none)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the manifest is damaged") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{path} has manifest format {data.get('format')!r}; this sipstream reads format {FORMAT}")
    return path.parent, data


def learner_manifest(run_dir: Path, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The learner manifest of a run: the run's own, or the one a pipeline manifest points at."""
    if data.get("kind") == "learner":
        return run_dir, data
    learner = data.get("learner_run")
    if not learner:
        raise UserError(f"{run_dir} is a {data.get('kind')} run without a learner; pass the learner's run directory")
    return load_manifest(run_dir / learner)


# --------------------------------------------------------------------------- topic ranges


def read_ends(bootstrap: str, bus: Any, names: list[str], start: dict[str, dict[int, int]] | None = None,
              quiet_s: float = 1.0, first_wait_s: float = 4.0, timeout_s: float = 120.0) -> dict[str, dict[int, list[int]]]:
    """{topic: {partition: [first, last + 1]}} of the records from `start` (default: the beginning) on.

    Read by consuming, never from watermarks (the embedded broker reports wrong high watermarks): the
    end is where nothing new arrived for `quiet_s` once records flow, or for `first_wait_s` when none
    arrived yet (a new consumer's first fetch can take seconds on a busy broker). Partitions without
    records are left out."""


    specs = T.load_specs(T.topics_dir(bus))
    consumer = Consumer(consumer_config(bus, bootstrap, group_id=f"{bus.group_prefix}.manifest")
                        | {"enable.partition.eof": False})
    live = {bus.topic(n): n for n in names}
    assignment = []
    for name in names:
        for p in range(specs[name].partitions):
            offset = (start or {}).get(name, {}).get(p, OFFSET_BEGINNING)
            assignment.append(TopicPartition(bus.topic(name), p, offset))
    consumer.assign(assignment)
    out: dict[str, dict[int, list[int]]] = {n: {} for n in names}
    deadline = time.monotonic() + timeout_s
    quiet_since, seen = time.monotonic(), False
    try:
        while time.monotonic() - quiet_since < (quiet_s if seen else first_wait_s) and time.monotonic() < deadline:
            messages = [m for m in consumer.consume(1000, timeout=0.2) if m.error() is None]
            if messages:
                quiet_since, seen = time.monotonic(), True
            for msg in messages:
                span = out[live[msg.topic()]].setdefault(msg.partition(), [msg.offset(), msg.offset() + 1])
                span[0], span[1] = min(span[0], msg.offset()), max(span[1], msg.offset() + 1)
    finally:
        consumer.close()
    return out


def topic_positions(bootstrap: str, bus: Any, names: list[str]) -> dict[str, dict[int, int]]:
    """{topic: {partition: next offset}}: where each topic ends now (call before a run starts)."""
    return {n: {p: span[1] for p, span in parts.items()} for n, parts in read_ends(bootstrap, bus, names).items()}


def topic_entry(live_name: str, role: str, partitions: dict[int, list[int]]) -> dict[str, Any]:
    return {"live_name": live_name, "role": role,
            "partitions": {str(p): list(span) for p, span in sorted(partitions.items())},
            "records": sum(e - s for s, e in partitions.values())}


# --------------------------------------------------------------------------- model files


def _file_sha256(path: Path, cache: dict[str, list[Any]]) -> str:
    """sha256 of a file, from `cache` while its path, mtime and size are unchanged."""
    stat = path.stat()
    key, seen = str(path.resolve()), cache.get(str(path.resolve()))
    if seen is not None and seen[:2] == [stat.st_mtime_ns, stat.st_size]:
        return seen[2]
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    cache[key] = [stat.st_mtime_ns, stat.st_size, digest.hexdigest()]
    return digest.hexdigest()


def files_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 of a file, or of a folder's files (relative path and sha256 of each, in path order).

    Gigabytes of weights take seconds to hash: each file's hash is kept in `cache_file` (a JSON map
    path → [mtime_ns, size, sha256]) and reused while the file's mtime and size are unchanged."""
    cache: dict[str, list[Any]] = {}
    if cache_file is not None:
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
    before = dict(cache)
    if path.is_file():
        out = _file_sha256(path, cache)
    else:
        digest = hashlib.sha256()
        files = [p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]  # scratch, caches
        for file in sorted(files):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file, cache)}\n".encode())
        out = digest.hexdigest()
    if cache_file is not None and cache != before:
        try:
            write_json(cache_file, cache)
        except OSError:
            pass  # a read-only cache folder only costs the next run another hash
    return out
