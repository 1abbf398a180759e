"""`decode_record`, the one decode path of every consumer: each class of rejection, and a valid record."""

from __future__ import annotations

import json

import pytest

from sipstream.bus import topics as T
from sipstream.bus.decode import Rejected, decode_record

SPEC = T.load_specs()[T.DOCUMENTS]
VALID = {"doc_id": "d1", "text": "Hello.", "source": "test"}


@pytest.mark.parametrize(("raw", "error", "reason"), [
    (None, "bad_json", "tombstone"),
    (json.dumps({**VALID, "text": "x" * 5000}).encode(), "too_large", "limit runner.max_record_bytes=4096"),
    (b'{"doc_id": "d1", "text": "\xff\xfe"}', "bad_encoding", "not UTF-8"),
    (b"{not json", "bad_json", "not JSON"),
    (json.dumps({**VALID, "text": "tail \ud800"}).encode(), "bad_encoding", "lone surrogate"),
    (json.dumps({**VALID, "doc_id": 42}).encode(), "schema", "doc_id: 42 is not of type 'string'"),
])
def test_each_bad_record_is_rejected_with_its_class_and_reason(raw: bytes | None, error: str, reason: str) -> None:
    rejected = decode_record(raw, SPEC, 4096)
    assert isinstance(rejected, Rejected)
    assert rejected.error == error and reason in rejected.reason


def test_a_valid_record_decodes_to_its_item() -> None:
    assert decode_record(json.dumps(VALID).encode(), SPEC, 4096) == VALID
    # Escaped text that is real text (not a lone surrogate) stays valid, and the limit is inclusive.
    escaped = json.dumps({**VALID, "text": "caf\u00e9 \U0001f600"}).encode()
    assert decode_record(escaped, SPEC, len(escaped)) == {**VALID, "text": "caf\u00e9 \U0001f600"}


def test_the_limit_is_named_as_the_caller_configures_it() -> None:
    rejected = decode_record(b"x" * 10, SPEC, 5, limit_name="learner.max_pair_bytes")
    assert isinstance(rejected, Rejected) and "learner.max_pair_bytes=5" in rejected.reason
