"""`sipstream ingest`: put documents on `sip.documents`.

Sources are local paths, directories, globs or fsspec URLs (`file://`, `s3://`, ...), in plain text (one
document per file), JSON Lines (one document per line; text field configurable) or Parquet (one per
row). Large files are streamed: a JSONL file line by line, a Parquet file batch by batch. Each document
gets a stable `doc_id` — the source's id field if configured, else a hash of its text — so ingesting the
same text twice yields the same items downstream, where duplicates are removed by `item_id`.

Bad input is never silently dropped: an empty, binary, non-UTF-8 or too large document is counted, logged
and put on `sip.deadletter` (stage `ingest`) with its reason and location, and ingestion continues. A too
large one is streamed through, never held whole: its dead letter keeps its head with its full size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import Producer

from sipstream.bus import topics as T
from sipstream.bus.client import producer_config
from sipstream.bus.deadletter import deadletter_record
from sipstream.config import BusConfig
from sipstream.errors import UserError
from sipstream.eval.heldout import training_corpus
from sipstream.telemetry.logs import get_logger

Format = Literal["auto", "text", "jsonl", "parquet"]
BUILTIN_CORPUS = "builtin:public_domain"
_EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl", ".parquet": "parquet"}


def content_doc_id(text: str) -> str:
    return "sha256-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class Rejected:
    """A source document that cannot become a record, and why."""

    source: str
    position: int  # line or row number in its file (0 for a whole-file document)
    reason: str
    raw: bytes  # the document, or only its head when it is too large to hold (then size and sha256 are set)
    size: int | None = None  # the whole document's bytes, when raw holds only its head
    sha256: str | None = None  # the whole document's sha256, when raw holds only its head


@dataclass
class IngestReport:
    ingested: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def _detect(path: str, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    for ext, kind in _EXTENSIONS.items():
        if path.lower().endswith(ext) or path.lower().endswith(ext + ".gz"):
            return kind
    raise UserError(f"cannot tell the format of {path}: use --format text|jsonl|parquet")


def _check_text(raw: bytes, max_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, else (None, reason)."""
    if len(raw) > max_bytes:
        return None, f"too large: {len(raw)} bytes > {max_bytes} (raise --max-document-bytes)"
    if b"\x00" in raw:
        return None, "binary: contains NUL bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8: {exc}"
    if not text.strip():
        return None, "empty document"
    return text, None


def _expand(sources: Iterable[str]) -> list[str]:
    import fsspec

    paths: list[str] = []
    for source in sources:
        fs, _, found = fsspec.get_fs_token_paths(source)
        found = [p for p in found if fs.exists(p)]
        if not found:
            raise UserError(f"no input matches {source}")
        for path in found:
            if fs.isdir(path):
                children = sorted(p for p in fs.find(path) if any(p.lower().endswith(e) for e in _EXTENSIONS))
                paths.extend(fs.unstrip_protocol(p) for p in children)
            else:
                paths.append(fs.unstrip_protocol(path))
    return paths


def iter_documents(
    sources: Iterable[str],
    fmt: Format = "auto",
    text_field: str = "text",
    id_field: str | None = None,
    max_document_bytes: int = 10 * 1024 * 1024,
) -> Iterator[dict[str, Any] | Rejected]:
    """Documents (sip.documents values) and rejections, streamed from the sources in order."""
    import fsspec

    for source in sources:
        if source == BUILTIN_CORPUS:
            # The held-out documents `sipstream eval` measures on never enter the training stream.

            yield from training_corpus()
            continue
        for path in _expand([source]):
            kind = _detect(path, fmt)
            if kind == "text":
                with fsspec.open(path, "rb", compression="infer") as f:
                    raw, whole = _read_bounded(f, max_document_bytes)
                if whole is not None:
                    size, sha256 = whole
                    yield Rejected(path, 0, f"too large: {size} bytes > {max_document_bytes} (raise --max-document-bytes)",
                                   raw, size, sha256)
                    continue
                text, reason = _check_text(raw, max_document_bytes)
                if reason:
                    yield Rejected(path, 0, reason, raw)
                else:
                    yield {"doc_id": content_doc_id(text), "text": text, "source": path, "meta": {}}
            elif kind == "jsonl":
                with fsspec.open(path, "rb", compression="infer") as f:
                    for lineno, line, whole in _bounded_lines(f, max_document_bytes):
                        if whole is not None:
                            size, sha256 = whole
                            yield Rejected(path, lineno, f"too large: line of {size} bytes > {max_document_bytes} "
                                                         "(raise --max-document-bytes)", line, size, sha256)
                        elif line.strip():
                            yield _from_record_bytes(line, path, lineno, text_field, id_field, max_document_bytes)
            else:
                yield from _iter_parquet(path, text_field, id_field, max_document_bytes)


def _read_bounded(f: Any, max_bytes: int, chunk: int = 1 << 20) -> tuple[bytes, tuple[int, str] | None]:
    """A whole file if it holds at most `max_bytes`: (its bytes, None). Else (its first `max_bytes` + 1 bytes,
    (its full size, its sha256)), the rest read through one chunk at a time and counted, never held."""
    head = f.read(max_bytes + 1)
    if len(head) <= max_bytes:
        return head, None
    digest, size = hashlib.sha256(head), len(head)
    while block := f.read(chunk):
        digest.update(block)
        size += len(block)
    return head, (size, digest.hexdigest())


def _bounded_lines(f: Any, max_bytes: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes, tuple[int, str] | None]]:
    """(line number, line, None) for each line of a binary file, never holding more than about `max_bytes`
    of one line: an over-long line yields its first `max_bytes` bytes and (its full size, its sha256), the
    line as read with its newline; the rest of it is read through, counted and dropped, so one huge line
    cannot exhaust memory."""
    lineno = 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) <= max_bytes or (len(line) == max_bytes + 1 and line.endswith(b"\n")):
            yield lineno, line, None
            continue
        digest, size, tail = hashlib.sha256(line), len(line), line
        while not tail.endswith(b"\n"):  # read through the rest of the over-long line, keeping none of it
            tail = f.readline(chunk)
            if not tail:
                break
            digest.update(tail)
            size += len(tail)
        yield lineno, line[:max_bytes], (size, digest.hexdigest())


def _from_record_bytes(
    line: bytes, path: str, position: int, text_field: str, id_field: str | None, max_bytes: int
) -> dict[str, Any] | Rejected:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Rejected(path, position, f"line is not JSON: {exc}", line)
    if not isinstance(record, dict):
        return Rejected(path, position, f"line is a JSON {type(record).__name__}, expected an object", line)
    return _from_record(record, path, position, text_field, id_field, max_bytes, line)


def _from_record(
    record: dict[str, Any], path: str, position: int, text_field: str, id_field: str | None, max_bytes: int, raw: bytes
) -> dict[str, Any] | Rejected:
    value = record.get(text_field)
    if not isinstance(value, str):
        return Rejected(path, position, f"field {text_field!r} missing or not a string (set --text-field)", raw)
    text, reason = _check_text(value.encode("utf-8", errors="surrogatepass"), max_bytes)
    if reason:
        return Rejected(path, position, reason, raw)
    doc_id = record.get(id_field) if id_field else None
    doc_id = str(doc_id) if doc_id not in (None, "") else content_doc_id(text)
    meta = {k: v for k, v in record.items() if k not in (text_field, id_field)}
    doc = {"doc_id": doc_id[:200], "text": text, "source": f"{path}#{position}", "meta": meta}
    try:  # an escaped lone surrogate ("\ud800") in another field is valid JSON but cannot be produced as UTF-8
        T.encode_value(doc)
    except UnicodeEncodeError as exc:
        return Rejected(path, position, f"not UTF-8: a field holds an escaped lone surrogate ({exc})", raw)
    return doc


def _iter_parquet(path: str, text_field: str, id_field: str | None, max_bytes: int) -> Iterator[dict | Rejected]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        reader = pq.ParquetFile(f)
        if text_field not in reader.schema_arrow.names:
            raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(reader.schema_arrow.names)})")
        row = 0
        for batch in reader.iter_batches(batch_size=1024):  # bounded memory on large files
            for record in batch.to_pylist():
                row += 1
                raw = json.dumps(record, default=str).encode()
                yield _from_record(dict(record.items()), path, row, text_field, id_field, max_bytes, raw)


def _rejection_record(rej: Rejected, limit: int = 256 * 1024) -> dict[str, Any]:
    error = ("too_large" if rej.reason.startswith("too large") else
             "bad_encoding" if "UTF-8" in rej.reason or "binary" in rej.reason else
             "bad_json" if "not JSON" in rej.reason else "schema")
    record = deadletter_record(stage="ingest", error=error, reason=rej.reason, topic=rej.source, partition=0,
                               offset=rej.position, raw=rej.raw, limit=limit)
    if rej.size is not None:  # raw is only the document's head: its size and sha256 are the whole document's
        record.update(value_bytes=rej.size, value_sha256=rej.sha256, truncated=True)
    return record


def produce_documents(
    bus: BusConfig, bootstrap: str, documents: Iterable[dict[str, Any] | Rejected], progress: bool = False
) -> IngestReport:
    """Validate and produce documents (keyed by doc_id) and rejections (to the dead-letter topic);
    return once every record is acknowledged."""

    log = get_logger(stage="ingest")
    spec = T.load_specs(T.topics_dir(bus))[T.DOCUMENTS]
    producer = Producer(producer_config(bus, bootstrap, client_id="sipstream-ingest"))
    report = IngestReport()
    failures: list[str] = []
    started = time.monotonic()

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    bar = None
    if progress:
        from rich.progress import Progress, SpinnerColumn, TextColumn

        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True)
        task = bar.add_task("ingesting")
        bar.start()
    try:
        for doc in documents:
            if isinstance(doc, Rejected):
                report.rejected[doc.reason.split(":")[0]] += 1
                log.warning("document rejected", source=doc.source, position=doc.position, reason=doc.reason)
                producer.produce(bus.topic(T.DEADLETTER), key=b"ingest", value=T.encode_value(_rejection_record(doc)),
                                 on_delivery=on_delivery)
                continue
            doc = {**doc, "doc_id": doc.get("doc_id") or content_doc_id(doc.get("text", ""))}
            errors = spec.errors(doc)
            if errors:
                raise UserError(f"document {doc.get('doc_id')!r} is invalid: {'; '.join(errors)}")
            producer.produce(bus.topic(T.DOCUMENTS), key=doc["doc_id"].encode(), value=T.encode_value(doc),
                             on_delivery=on_delivery)
            producer.poll(0)
            report.ingested += 1
            if bar is not None:
                bar.update(task, description=f"ingested {report.ingested}, rejected {sum(report.rejected.values())}")
    finally:
        remaining = producer.flush(30.0)
        if bar is not None:
            bar.stop()
    if remaining or failures:
        raise UserError(f"{remaining + len(failures)} records were not acknowledged by the broker: {failures[:3]}")
    report.seconds = time.monotonic() - started
    return report
