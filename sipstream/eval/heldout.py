"""Held-out splits of the shipped data: what evaluation may see and training never does.

A record is held out when a hash of its id falls in a fixed bucket, so membership is a property of
the id alone: it does not move when records are added, reordered or removed, and any process
(ingest, the learner's experiment code, `sipstream eval`) computes the same split without shared
state. The salt names the split rule; changing it would silently mix old held-out records into
training, so it never changes.

- corpus documents: about 1 in 8 (`HELDOUT_FRACTION["corpus"]`); the default training stream
  (`builtin:public_domain`, via :func:`training_corpus`) leaves them out;
- probe sets (unsafe / false / toxic texts): about 1 in 4 are held out for evaluation; an experiment
  that mixes probe texts into training takes them from :func:`training_probes` only.
"""

from __future__ import annotations

import hashlib

from sipstream.data import load_corpus, load_probes

__all__ = [
    "HELDOUT_FRACTION",
    "heldout_corpus",
    "heldout_probes",
    "is_heldout",
    "training_corpus",
    "training_probes",
]

_SALT = "sipstream-heldout"
#: One in N records of each kind is held out.
HELDOUT_FRACTION: dict[str, int] = {"corpus": 8, "probes": 4}


def is_heldout(kind: str, record_id: str) -> bool:
    """Whether the record ``record_id`` of ``kind`` (``"corpus"`` or a probe set's name) is held out.

    sha256, not Python's ``hash``: the latter is salted per process and would split differently in
    every worker."""
    denominator = HELDOUT_FRACTION["corpus" if kind == "corpus" else "probes"]
    digest = hashlib.sha256(f"{_SALT}:{kind}:{record_id}".encode()).hexdigest()
    return int(digest[:8], 16) % denominator == 0


def heldout_corpus() -> list[dict]:
    """The shipped corpus documents kept for evaluation (file order)."""

    return [doc for doc in load_corpus() if is_heldout("corpus", doc["doc_id"])]


def training_corpus() -> list[dict]:
    """The shipped corpus without its held-out documents: the default training stream."""

    return [doc for doc in load_corpus() if not is_heldout("corpus", doc["doc_id"])]


def heldout_probes(name: str) -> list[dict]:
    """Records of probe set ``name`` kept for evaluation (file order)."""

    return [probe for probe in load_probes(name) if is_heldout(name, probe["probe_id"])]


def training_probes(name: str) -> list[dict]:
    """Records of probe set ``name`` that training may use (the rest of the set)."""

    return [probe for probe in load_probes(name) if not is_heldout(name, probe["probe_id"])]
