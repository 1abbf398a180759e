"""Bad input, fuzzed with hypothesis: empty, huge (>10 MB), binary, invalid UTF-8, wrong schema and wrong types,
both into `sipstream ingest` (files) and straight onto a stage's input topic (the split stage, on the real
broker). Every bad record gets a dead letter with a clear reason, every good one goes through, the process
never crashes and its memory stays bounded. Prompt injection aimed at the judge is in
test_prompt_injection.py."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipstream.bus import topics as T
from sipstream.bus.tail import TopicTail

HUGE = 10 * 1024 * 1024 + 1024  # just over the 10 MiB default limits
RSS_GROWTH_LIMIT_MB = 250
FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

good_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=200).filter(str.strip)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
# A document-ish JSON object with fields of the wrong type or missing.
wrong_documents = st.fixed_dictionaries({}, optional={"doc_id": json_values, "text": json_values, "source": json_values,
                                                      "meta": json_values})
invalid_utf8 = st.binary(min_size=1, max_size=60).map(lambda b: b + b"\xff\xfe\xc3")
binary = st.binary(min_size=1, max_size=200).map(lambda b: b"\x00" + b)
jsonl_lines = st.one_of(
    good_text.map(lambda t: json.dumps({"text": t}).encode()),
    wrong_documents.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    invalid_utf8, binary, st.just(b""), st.just(b'{"text": ""}'), st.just(b"{not json"),
)
ingest_files = st.lists(st.one_of(
    st.tuples(st.just("jsonl"), st.lists(jsonl_lines, max_size=6).map(lambda ls: b"\n".join(ls))),
    st.tuples(st.just("txt"), st.one_of(good_text.map(str.encode), invalid_utf8, binary, st.just(b""), st.just(b" \n "))),
), min_size=1, max_size=4)


def _expected_ingest_outcome(kind: str, data: bytes) -> list[str]:
    """What each input unit should become: 'ok' or the dead-letter error class (an independent reading)."""
    units = [line for line in data.split(b"\n") if line.strip()] if kind == "jsonl" else [data]
    outcomes = []
    for unit in units:
        if kind == "txt":
            outcomes.append("bad_encoding" if b"\x00" in unit or not _utf8(unit) else "ok" if unit.decode().strip() else "schema")
            continue
        try:
            value = json.loads(unit)
        except ValueError:
            outcomes.append("bad_json")
            continue
        text = value.get("text") if isinstance(value, dict) else None
        if not isinstance(text, str):
            outcomes.append("schema")
        elif "\x00" in text:
            outcomes.append("bad_encoding")
        else:
            outcomes.append("ok" if text.strip() else "schema")
    return outcomes


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_fuzzed_files_into_ingest_are_produced_or_dead_lettered_with_a_reason(bus, process_rss, figures) -> None:
    from sipstream.ingest import Rejected, iter_documents, produce_documents

    totals = {"inputs": 0, "ingested": 0, "rejected": 0}
    rss_before = process_rss()

    @FUZZ
    @given(files=ingest_files)
    def check(files: list[tuple[str, bytes]]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            paths, expected = [], []
            for i, (kind, data) in enumerate(files):
                path = Path(folder) / f"f{i}.{kind}"
                path.write_bytes(data)
                paths.append(str(path))
                expected += _expected_ingest_outcome(kind, data)
            out = list(iter_documents(paths))
            got = ["ok" if not isinstance(d, Rejected) else _error_class(d) for d in out]
            assert got == expected
            assert all(d.reason for d in out if isinstance(d, Rejected))
            report = produce_documents(bus.cfg.bus, bus.bootstrap, out)  # schema-checked, acknowledged
            assert report.ingested == got.count("ok") and sum(report.rejected.values()) == len(got) - got.count("ok")
            totals["inputs"] += len(got)
            totals["ingested"] += report.ingested
            totals["rejected"] += len(got) - report.ingested

    check()

    # Huge: a >10 MB document file and a >10 MB JSONL line, read without holding more than the limit.
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "huge.txt").write_bytes(b"a" * HUGE)
        (Path(folder) / "huge.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "' + b"b" * HUGE + b'"}\n{"text": "after"}\n')
        out = list(iter_documents([str(Path(folder) / "huge.txt"), str(Path(folder) / "huge.jsonl")]))
    assert [_error_class(d) if isinstance(d, Rejected) else d["text"] for d in out] == ["too_large", "ok", "too_large", "after"]
    report = produce_documents(bus.cfg.bus, bus.bootstrap, out)
    totals["inputs"] += 4
    totals["ingested"] += report.ingested
    totals["rejected"] += 4 - report.ingested

    dead = [d for d in bus.values(T.DEADLETTER, expect=totals["rejected"], timeout=30) if d["stage"] == "ingest"]
    assert len(dead) == totals["rejected"] and all(d["reason"] and d["error"] for d in dead)
    assert max(d["value_bytes"] for d in dead) <= HUGE and all(len(d["value_b64"]) < 400_000 for d in dead)
    growth = process_rss() - rss_before
    assert growth < RSS_GROWTH_LIMIT_MB
    figures("bad_input.ingest", inputs=totals["inputs"], ingested=totals["ingested"], deadlettered=len(dead),
            reasons=sorted({d["reason"].split(":")[0] for d in dead}), rss_growth_mb=round(growth, 1))


def _error_class(rejected) -> str:
    from sipstream.ingest import _rejection_record

    return _rejection_record(rejected)["error"]


# --------------------------------------------------------------------------- straight onto a stage's input topic

topic_payloads = st.lists(st.one_of(
    st.builds(lambda i, t: json.dumps({"doc_id": f"fz{i}", "text": t, "source": "fuzz"}).encode(), st.integers(0, 10**9), good_text),
    wrong_documents.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    invalid_utf8, st.binary(max_size=100), st.just(b""), st.just(b"{not json"),
), min_size=1, max_size=10)


def _expected_runner_outcome(payload: bytes, spec) -> str:
    try:
        value = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return "bad_encoding"
    except ValueError:
        return "bad_json"
    return "schema" if spec.errors(value) else "ok"


def test_fuzzed_records_on_a_stage_input_topic_are_dead_lettered_and_the_stage_keeps_running(
    bus, tmp_path_factory, process_rss, figures
) -> None:
    from confluent_kafka import Producer

    from sipstream.bus.runner import StageRunner
    from sipstream.config import merged
    from sipstream.stages import build_stage

    cfg = merged(bus.cfg, models={"policy": {"source": "tiny-gpt2", "cache_dir": str(tmp_path_factory.mktemp("cache")),
                                             "device": "cpu"}},
                 items={"suffix_tokens": 16, "min_suffix_tokens": 1, "min_prefix_tokens": 0, "max_items_per_document": 2})
    runner = StageRunner(build_stage("split", cfg), cfg, bus.bootstrap)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    dead: dict[tuple[int, int], dict] = {}
    tail = TopicTail(bus.bootstrap, bus.topic(T.DEADLETTER), T.load_specs()[T.DEADLETTER].partitions,
                     on_record=lambda d: dead.__setitem__((d["partition"], d["offset"]), d))
    producer = Producer({"bootstrap.servers": bus.bootstrap, "message.max.bytes": 16 * 1024 * 1024})
    spec = T.load_specs()[T.DOCUMENTS]
    rss_before = process_rss()

    def wait_handled(total: int, positions: set[tuple[int, int]]) -> None:
        """Until the runner processed or dead-lettered `total` records and the dead letters among `positions` arrived."""
        c = runner.stats.counters
        deadline = time.monotonic() + 60
        while c["processed"] + c["deadlettered"] < total or (c["deadlettered"] > len(dead) and not positions <= dead.keys()):
            assert thread.is_alive(), "the stage runner died"
            assert time.monotonic() < deadline, f"handled {c['processed'] + c['deadlettered']} of {total}"
            tail.poll(0.2)

    outcomes: list[str] = []
    try:
        @FUZZ
        @given(payloads=topic_payloads)
        def check(payloads: list[bytes]) -> None:
            base = len(outcomes)
            keyed = {f"k{base + i}".encode(): p for i, p in enumerate(payloads)}
            positions: dict[bytes, tuple[int, int]] = {}
            for key, payload in keyed.items():
                producer.produce(bus.topic(T.DOCUMENTS), value=payload, key=key,
                                 on_delivery=lambda err, msg: positions.__setitem__(msg.key(), (msg.partition(), msg.offset())))
            assert producer.flush(30) == 0
            outcomes.extend(_expected_runner_outcome(p, spec) for p in payloads)
            wait_handled(len(outcomes), {positions[k] for k, p in keyed.items() if _expected_runner_outcome(p, spec) != "ok"})
            for key, payload in keyed.items():
                expected = _expected_runner_outcome(payload, spec)
                letter = dead.get(positions[key])
                if expected == "ok":
                    assert letter is None, letter
                else:
                    assert letter is not None and letter["error"] == expected and letter["reason"], (payload[:80], letter)

        check()
        # Huge (>10 MB) straight onto the topic: dead-lettered unread, its first bytes kept.
        positions: dict[bytes, tuple[int, int]] = {}
        producer.produce(bus.topic(T.DOCUMENTS), value=b"h" * HUGE, key=b"huge",
                         on_delivery=lambda err, msg: positions.__setitem__(msg.key(), (msg.partition(), msg.offset())))
        assert producer.flush(30) == 0
        outcomes.append("too_large")
        wait_handled(len(outcomes), {positions[b"huge"]})
        huge_letter = dead[positions[b"huge"]]
        assert huge_letter["error"] == "too_large" and huge_letter["truncated"] and huge_letter["value_bytes"] == HUGE
        assert thread.is_alive()
    finally:
        runner.stop()
        thread.join(30)
        tail.close()
    growth = process_rss() - rss_before
    assert growth < RSS_GROWTH_LIMIT_MB
    counters = runner.stats.counters
    assert counters["consumed"] == len(outcomes) and counters["deadlettered"] == len(outcomes) - outcomes.count("ok")
    figures("bad_input.stage_topic", records_in=len(outcomes), processed=counters["processed"],
            deadlettered=counters["deadlettered"],
            by_error={k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("deadlettered.")},
            items_out=counters["produced"], rss_growth_mb=round(growth, 1))
