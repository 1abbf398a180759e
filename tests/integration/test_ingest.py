"""`sipstream ingest` against the real broker: formats, stable ids, rejections to the dead-letter topic."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sipstream.bus import topics as T
from sipstream.ops.ingest import Rejected, content_doc_id, iter_documents, produce_documents


def write_inputs(root: Path) -> None:
    (root / "a.txt").write_text("It was the best of times.\n\nIt was the worst of times.")
    (root / "empty.txt").write_text("   \n")
    (root / "bin.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "lines.jsonl").write_text(
        '{"text": "one", "id": "x1", "lang": "en"}\nnot json\n\n{"body": "no text"}\n[1, 2]\n{"text": "two"}\n')
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": ["r1", "r2"], "n": [1, 2]}), root / "rows.parquet")


def test_formats_ids_and_rejections(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    out = list(iter_documents([str(tmp_path)], id_field="id"))
    docs = [d for d in out if not isinstance(d, Rejected)]
    rejected = [d for d in out if isinstance(d, Rejected)]
    texts = {d["text"]: d for d in docs}
    assert set(texts) == {"It was the best of times.\n\nIt was the worst of times.", "one", "two", "p1", "p2"}
    assert texts["one"]["doc_id"] == "x1" and texts["one"]["meta"] == {"lang": "en"}
    assert texts["two"]["doc_id"] == content_doc_id("two")  # no id field: content hash
    assert texts["p2"]["doc_id"] == "r2" and texts["p2"]["meta"] == {"n": 2}
    reasons = sorted(r.reason.split(":")[0] for r in rejected)
    assert reasons == ["binary", "empty document", "field 'text' missing or not a string (set --text-field)",
                       "line is a JSON list, expected an object", "line is not JSON", "not UTF-8"]
    # Re-reading gives the same ids: re-ingesting is idempotent downstream.
    assert [d["doc_id"] for d in docs] == [d["doc_id"] for d in iter_documents([str(tmp_path)], id_field="id")
                                           if not isinstance(d, Rejected)]


def test_ingest_produces_documents_and_dead_letters(bus, tmp_path: Path) -> None:
    write_inputs(tmp_path)
    report = produce_documents(bus.cfg.bus, bus.bootstrap, iter_documents([str(tmp_path / "*.*")]))
    assert report.ingested == 5 and sum(report.rejected.values()) == 6
    docs = bus.values(T.DOCUMENTS, expect=5)
    assert all(T.load_specs()[T.DOCUMENTS].errors(d) == [] for d in docs)
    dead = bus.values(T.DEADLETTER, expect=6)
    assert {d["stage"] for d in dead} == {"ingest"}
    latin = next(d for d in dead if d["topic"].endswith("latin1.txt"))
    assert "not UTF-8" in latin["reason"] and base64.b64decode(latin["value_b64"]) == "caf\xe9".encode("latin-1")
    bad_line = next(d for d in dead if d["reason"].startswith("line is not JSON"))
    assert bad_line["offset"] == 2 and base64.b64decode(bad_line["value_b64"]).strip() == b"not json"


def test_ingest_cli_reads_the_builtin_corpus(bus) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sipstream", "ingest", "builtin:public_domain", "--limit", "3", "-b", bus.bootstrap,
         "--set", f"bus.topic_prefix={bus.cfg.bus.topic_prefix}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ingested 3 documents" in result.stdout
    assert len(bus.values(T.DOCUMENTS, expect=3)) == 3


def test_a_too_large_document_is_dead_lettered_with_its_full_size_and_sha256(bus, tmp_path: Path) -> None:
    """Issue 18 defect 6: a 20 MB file was reported as "too large: 10485761 bytes", and its dead letter's
    value_bytes and sha256 covered only the first 10 MiB read."""
    text = b"word " * 4_000_000  # 20,000,000 bytes of valid text, over the default 10 MiB limit
    (tmp_path / "big.txt").write_bytes(text)
    line = b'{"text": "' + b"x" * 5000 + b'"}\n'  # one JSONL line over a 1,000-byte limit
    (tmp_path / "long.jsonl").write_bytes(b'{"text": "short"}\n' + line + b'{"text": "after"}\n')

    report = produce_documents(bus.cfg.bus, bus.bootstrap, iter_documents([str(tmp_path / "big.txt")]))
    assert report.ingested == 0 and sum(report.rejected.values()) == 1
    dead = bus.values(T.DEADLETTER, expect=1)[0]
    assert dead["error"] == "too_large" and dead["offset"] == 0
    assert dead["reason"].startswith(f"too large: {len(text)} bytes > {10 * 1024 * 1024}"), dead["reason"]
    assert dead["value_bytes"] == len(text)
    assert dead["value_sha256"] == hashlib.sha256(text).hexdigest()
    assert dead["truncated"] is True and text.startswith(base64.b64decode(dead["value_b64"]))

    out = list(iter_documents([str(tmp_path / "long.jsonl")], max_document_bytes=1000))
    assert [d["text"] for d in out if not isinstance(d, Rejected)] == ["short", "after"]
    produce_documents(bus.cfg.bus, bus.bootstrap, [d for d in out if isinstance(d, Rejected)])
    dead = bus.values(T.DEADLETTER, expect=2)[1]
    assert dead["offset"] == 2 and dead["reason"].startswith(f"too large: line of {len(line)} bytes > 1000"), dead["reason"]
    assert dead["value_bytes"] == len(line) and dead["value_sha256"] == hashlib.sha256(line).hexdigest()
