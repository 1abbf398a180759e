"""Which weights a model reference names, and loading them (once per process).

A reference is what a user types after ``--model`` / ``--baseline``:

- ``start``: the configured policy (``models.policy``) as it is built, before any training. With a
  run's own config (what `sipstream eval` uses when ``--model`` or ``--baseline`` is a run directory
  and no ``--config`` is given, see :func:`sipstream.eval.cli.load_eval_config`) that is the
  checkpoint the run started from;
- a ``.safetensors`` file (local path, ``file://`` or any fsspec URI), e.g. one the learner
  published: loaded into the configured policy after checking its sha256;
- a run directory (``sipstream run`` or ``sipstream learner``): its latest published weights,
  found from the weight sidecars the learner writes next to each file, the learner manifest's
  ``final_weights`` and an exported ``sip.weights`` topic;
- ``RUN_DIR@VERSION``: that run's publication number VERSION.

Loaded models are kept in a small per-process cache keyed by what they hold (weights sha256), since an
experiment evaluates many arms against the same baseline.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sipstream.errors import UserError
from sipstream.models import load_text_model
from sipstream.models.base import TextModel, WeightsMismatchError, sha256_file
from sipstream.telemetry.logs import get_logger

START = "start"
ACCEPTED = ("'start', a .safetensors file (path or URI), a run directory, or RUN_DIR@VERSION")
#: Policies kept loaded at once (a model and its baseline); older ones are dropped to bound memory.
MAX_CACHED_POLICIES = 2
_VERSION_SUFFIX = re.compile(r"^(?P<run>.+)@(?P<version>\d+)$")
_SIDECAR = re.compile(r"^v(\d{8})\.json$")



def _log():
    """The eval's logger, bound when used: a logger bound at import would keep structlog's default
    configuration (stdout) instead of the CLI's (stderr), and corrupt `--json` output."""
    return get_logger(stage="eval")


@dataclass(frozen=True)
class WeightsRef:
    """Resolved weights: where to read them and their sha256 (None for the configured policy as built)."""

    label: str
    path_or_uri: str | None
    sha256: str | None
    version: int | None = None


@dataclass
class LoadedPolicy:
    model: TextModel
    ref: WeightsRef
    identity: str  # what decides the model's outputs: policy spec + weights sha256


_POLICIES: OrderedDict[str, LoadedPolicy] = OrderedDict()


# --------------------------------------------------------------------------- resolving references


def _uri_sha256(uri: str) -> str:
    """sha256 of a local path or remote fsspec URI (read in blocks)."""
    if "://" not in uri or uri.startswith("file://"):
        return sha256_file(uri.removeprefix("file://"))
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _publication(record: dict[str, Any], local_file: Path | None) -> dict[str, Any] | None:
    """{version, sha256, where, run_name} of a sidecar / announcement / manifest entry, or None if incomplete."""
    if not isinstance(record, dict) or not {"version", "sha256", "uri"} <= record.keys():
        return None
    where = str(local_file) if local_file is not None and local_file.is_file() else str(record["uri"])
    return {"version": int(record["version"]), "sha256": str(record["sha256"]), "where": where,
            "run_name": record.get("run_name")}


def run_publications(run_dir: Path) -> dict[int, dict[str, Any]]:
    """{version: publication} of the weights a run directory published.

    Three records say what was published; all are read, since a run may have only some of them:
    the sidecar JSON next to each weights file (the file beside it is used even when the run
    directory was moved, its recorded URI then being stale), the learner manifest's final weights,
    and an exported ``sip.weights`` topic."""
    found: dict[int, dict[str, Any]] = {}

    def add(publication: dict[str, Any] | None, prefer: bool = False) -> None:
        if publication is not None and (prefer or publication["version"] not in found):
            found[publication["version"]] = publication

    for path in sorted(run_dir.rglob("v*.json")):  # also when given the weight store's folder itself
        if _SIDECAR.match(path.name):
            try:
                add(_publication(json.loads(path.read_text(encoding="utf-8")), path.with_suffix(".safetensors")),
                    prefer=True)
            except (OSError, ValueError):
                _log().warning("unreadable weights sidecar", path=str(path))
    for path in sorted(run_dir.glob("**/sip.weights/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                add(_publication(json.loads(json.loads(line)["value"]), None))
            except (ValueError, KeyError, TypeError):
                continue
    for manifest in sorted(run_dir.glob("**/manifest.json")):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        add(_publication((data.get("learner") or {}).get("final_weights") or {}, None))
    run_names = {p["run_name"] for p in found.values() if p["run_name"]}
    if len(run_names) > 1:
        raise UserError(f"{run_dir} holds weights of several learner runs ({', '.join(sorted(run_names))}); "
                        "pass one learner's directory or a .safetensors file")
    return found


def split_run_ref(ref: str) -> tuple[Path, int | None] | None:
    """(run directory, version or None) when ``ref`` is ``RUN_DIR`` or ``RUN_DIR@VERSION`` of an existing
    directory; None for every other form."""
    if ref == START:
        return None
    match = _VERSION_SUFFIX.match(ref)
    run_part, version = (match["run"], int(match["version"])) if match else (ref, None)
    return (Path(run_part), version) if Path(run_part).is_dir() else None


def resolve_weights(ref: str) -> WeightsRef:
    """What ``ref`` names (see the module docstring); a UserError naming the accepted forms otherwise."""
    if ref == START:
        return WeightsRef(START, None, None)
    run = split_run_ref(ref)
    if run is not None:
        run_part, version = str(run[0]), run[1]
        publications = run_publications(Path(run_part))
        if not publications:
            raise UserError(f"no published weights found in run directory {run_part} (the learner writes "
                            "<run>/<name>/weights/<name>/vNNNNNNNN.safetensors with a .json sidecar)")
        if version is None:
            version = max(publications)
        if version not in publications:
            raise UserError(f"{run_part} has no weights version {version}; it has "
                            f"{', '.join(str(v) for v in sorted(publications))}")
        publication = publications[version]
        return WeightsRef(f"{run_part}@{version}", publication["where"], publication["sha256"], version)
    if ref.endswith(".safetensors"):
        local = "://" not in ref or ref.startswith("file://")
        if local and not Path(ref.removeprefix("file://")).is_file():
            raise UserError(f"weights file not found: {ref}")
        try:
            digest = _uri_sha256(ref)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read weights {ref}: {exc}") from None
        return WeightsRef(ref, ref, digest)
    raise UserError(f"cannot evaluate model {ref!r}: pass {ACCEPTED}")


# --------------------------------------------------------------------------- loading


def policy_identity(cfg: Any, weights: WeightsRef) -> str:
    """A key for everything that decides the policy's outputs: its spec and its weights."""
    return f"{cfg.models.policy.model_dump_json()}|{weights.sha256 or START}"


def load_resolved(cfg: Any, weights: WeightsRef) -> LoadedPolicy:
    """The policy holding ``weights``, from the cache or freshly built (a new instance, never the
    stages' shared one, so loading weights into it cannot touch a judge built from the same spec)."""

    identity = policy_identity(cfg, weights)
    if identity in _POLICIES:
        _POLICIES.move_to_end(identity)
        return _POLICIES[identity]
    model = load_text_model(cfg.models.policy)
    if weights.path_or_uri is not None:
        assert weights.sha256 is not None
        try:
            model.load_weights(weights.path_or_uri, weights.sha256, version=weights.sha256)
        except WeightsMismatchError as exc:
            raise UserError(f"weights {weights.label} do not fit models.policy ({cfg.models.policy.source}): {exc}; "
                            "set --set models.policy.source=... to the model they were trained from") from None
    _log().info("policy loaded", ref=weights.label, sha256=weights.sha256, source=str(cfg.models.policy.source))
    loaded = LoadedPolicy(model, weights, identity)
    _POLICIES[identity] = loaded
    while len(_POLICIES) > MAX_CACHED_POLICIES:
        _POLICIES.popitem(last=False)
    return loaded


def load_policy(cfg: Any, ref: str) -> TextModel:
    """The configured policy (``cfg.models.policy``) with the weights ``ref`` names; see the module
    docstring for the accepted forms. Unknown forms raise a UserError that lists them."""
    return load_resolved(cfg, resolve_weights(ref)).model


def clear_cache() -> None:
    """Forget loaded policies (tests; a long-lived process that wants the memory back)."""
    _POLICIES.clear()
