"""The one place a consumed record becomes an item: size limit, UTF-8, JSON, text, schema.

Every consumer of the bus (the stage runner, its control topics, the learner, replay) decodes with
`decode_record`, so a check added here holds everywhere. A record that fails comes back as a
`Rejected` whose `error` is one of the `sip.deadletter` error classes and whose `reason` is for people.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sipstream.bus.topics import TopicSpec, encode_value


@dataclass(frozen=True)
class Rejected:
    """Why a record (or what a stage made of it) cannot go on; destined for `sip.deadletter`."""

    error: str
    """One of the sip.deadletter `error` enum values (too_large, bad_encoding, bad_json, schema, ...)."""
    reason: str


def decode_record(raw: bytes | None, spec: TopicSpec, max_bytes: int, *, limit_name: str = "runner.max_record_bytes"
                  ) -> dict[str, Any] | Rejected:
    """The record's value as a schema-valid item of `spec`, or why not."""
    if raw is None:
        return Rejected("bad_json", "empty value (tombstone)")
    if len(raw) > max_bytes:
        return Rejected("too_large", f"value has {len(raw)} bytes, limit {limit_name}={max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("bad_encoding", f"value is not UTF-8: {exc}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejected("bad_json", f"value is not JSON: {exc}")
    if "\\u" in text:
        # An escaped lone surrogate ("\ud800") is valid JSON but no text: passed on, it would fail our
        # own produce (UTF-8) after the batch was processed and crash the consumer on every re-delivery.
        try:
            encode_value(value)
        except UnicodeEncodeError as exc:
            return Rejected("bad_encoding", f"value holds an escaped lone surrogate, which is not text: {exc}")
    errors = spec.errors(value)
    if errors:
        return Rejected("schema", f"violates {spec.name} schema: " + "; ".join(errors[:5]))
    return value
