"""The one shape of a `sip.deadletter` record, built in one place for every producer of dead letters
(the stage runner, the learner, ingest)."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any


def deadletter_record(
    *,
    stage: str,
    error: str,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    raw: bytes,
    limit: int,
    key: bytes | None = None,
    instance: str | None = None,
) -> dict[str, Any]:
    """The original bytes are kept up to `limit` (with their full size and sha256); the source coordinates
    still point at the whole record."""
    record: dict[str, Any] = {
        "stage": stage,
        "error": error,
        "reason": reason,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": None if key is None else key.decode("utf-8", errors="replace"),
        "value_b64": base64.b64encode(raw[:limit]).decode("ascii"),
        "value_bytes": len(raw),
        "value_sha256": hashlib.sha256(raw).hexdigest(),
        "truncated": len(raw) > limit,
        "ts": time.time(),
    }
    if instance is not None:
        record["instance"] = instance
    return record


def deadletter_from_message(msg: Any, *, stage: str, instance: str, error: str, reason: str, limit: int) -> dict[str, Any]:
    """A dead letter for a consumed Kafka message."""
    return deadletter_record(stage=stage, instance=instance, error=error, reason=reason, topic=msg.topic(),
                             partition=msg.partition(), offset=msg.offset(), raw=msg.value() or b"", limit=limit,
                             key=msg.key())
