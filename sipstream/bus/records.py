"""Typed views of the topic values, one per topic spec in `topics/`.

The JSON Schemas in `topics/` are the contract on the wire (validated by the runner); these
TypedDicts are the same contract for the type checker and the reader of stage code. A unit test
keeps the two in step (required keys here == `required` in the spec).

No `from __future__ import annotations` here: TypedDict must see `NotRequired` unevaluated-free at
class creation to compute `__required_keys__` correctly on Python 3.11.
"""


from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

CandidateKind = Literal["original", "rewrite", "rollout"]


class Document(TypedDict):
    doc_id: str
    text: str
    source: str
    meta: NotRequired[dict[str, Any]]


class Echo(Document):
    echoed_by: str


class Prefix(TypedDict):
    item_id: str
    doc_id: str
    chunk_index: int
    prefix: str
    suffix: str
    seed: int


class Rewritten(Prefix):
    rewrite: str | None
    why: list[str]


class Rollouts(Rewritten):
    rollouts: list[str]
    policy_version: int


class CandidateScore(TypedDict):
    kind: CandidateKind
    index: int
    quality: float
    safety: float
    factuality: float
    total: float


class Judged(Rollouts):
    scores: list[CandidateScore]


class Candidate(TypedDict):
    kind: CandidateKind
    index: int
    text: str
    total: float


class Pair(TypedDict):
    item_id: str
    doc_id: str
    prefix: str
    suffix: str
    seed: int
    policy_version: int
    chosen: Candidate | None
    rejected: Candidate | None
    target: Candidate | None
    why: NotRequired[list[str]]


class WeightsAnnouncement(TypedDict):
    """A claim check: the tensors live in the weight store at `uri`."""

    run_name: str
    version: int
    uri: str
    sha256: str
    step: int
    created_at: str
    algo: NotRequired[str]


def weights_announcement(*, run_name: str, version: int, uri: str, sha256: str, step: int, created_at: str,
                         algo: str | None = None) -> WeightsAnnouncement:
    """The one builder of a `sip.weights` record (the learner publishes with it)."""
    record = WeightsAnnouncement(run_name=run_name, version=version, uri=uri, sha256=sha256, step=step,
                                 created_at=created_at)
    if algo is not None:
        record["algo"] = algo
    return record


def parse_weights_announcement(value: Mapping[str, Any]) -> WeightsAnnouncement:
    """The one parser of a `sip.weights` record (rollout workers and the supervisor read with it).

    Checks the fields a reader relies on, by type, so a record that slipped past schema validation (a
    hand-written one, an older producer) fails here with a `ValueError` naming the field."""
    types = {"run_name": str, "version": int, "uri": str, "sha256": str, "step": int, "created_at": str}
    for key, kind in types.items():
        if not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
            raise ValueError(f"sip.weights record: {key} must be {kind.__name__}, got {value.get(key)!r}")
    algo = value.get("algo")
    if algo is not None and not isinstance(algo, str):
        raise ValueError(f"sip.weights record: algo must be str, got {algo!r}")
    return weights_announcement(**{k: value[k] for k in types}, algo=algo)


class Metrics(TypedDict):
    source: str
    instance: str
    ts: float
    counters: dict[str, float]
    interval_s: NotRequired[float]
    gauges: NotRequired[dict[str, float | None]]


class DeadLetter(TypedDict):
    stage: str
    error: Literal["too_large", "bad_encoding", "bad_json", "schema", "process", "bad_output", "output_too_large"]
    reason: str
    topic: str
    partition: int
    offset: int
    value_b64: str
    value_bytes: int
    value_sha256: str
    truncated: bool
    ts: float
    instance: NotRequired[str]
    key: NotRequired[str | None]


# Topic (as named in topics/) → its typed record.
RECORDS: dict[str, type] = {
    "sip.documents": Document,
    "sip.echo": Echo,
    "sip.prefixes": Prefix,
    "sip.rewritten": Rewritten,
    "sip.rollouts": Rollouts,
    "sip.judged": Judged,
    "sip.pairs": Pair,
    "sip.weights": WeightsAnnouncement,
    "sip.metrics": Metrics,
    "sip.deadletter": DeadLetter,
}
