"""Putting documents on `sip.documents`.

A document's `doc_id` is the content hash of its text unless the source gives one, so re-ingesting the
same text is idempotent downstream (same doc_id → same item_ids → deduplicated).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from sipstream.bus import topics as T
from sipstream.bus.client import producer_config
from sipstream.config import BusConfig
from sipstream.errors import UserError


def content_doc_id(text: str) -> str:
    return "sha256-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def produce_documents(bus: BusConfig, bootstrap: str, documents: Iterable[dict[str, Any]]) -> int:
    """Validate and produce documents (keyed by doc_id); return how many were acknowledged."""
    from confluent_kafka import Producer

    spec = T.load_specs(T.topics_dir(bus))[T.DOCUMENTS]
    producer = Producer(producer_config(bus, bootstrap, client_id="sipstream-ingest"))
    failures: list[str] = []
    sent = 0

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    try:
        for doc in documents:
            doc = {"doc_id": doc.get("doc_id") or content_doc_id(doc.get("text", "")), **doc}
            errors = spec.errors(doc)
            if errors:
                raise UserError(f"document {doc.get('doc_id')!r} is invalid: {'; '.join(errors)}")
            producer.produce(bus.topic(T.DOCUMENTS), key=doc["doc_id"].encode(), value=T.encode_value(doc), on_delivery=on_delivery)
            producer.poll(0)
            sent += 1
    finally:
        remaining = producer.flush(30.0)
    if remaining or failures:
        raise UserError(f"{remaining + len(failures)} of {sent} documents were not acknowledged by the broker: {failures[:3]}")
    return sent
