"""Archive a run's topics to files and put them back on any cluster.

`export_topic` writes the range of one topic that a run recorded in its manifest to an fsspec URI
(`file://`, `s3://`, a plain path), with the run's manifest and consumption log beside it (`export_topics`
does several topics, reading all their partitions at once):

    <uri>/export.json                    what is here: format, topics, ranges, files, record counts
    <uri>/manifest.json                  the run's manifest (and consumption.jsonl, for a learner run)
    <uri>/<topic>/partition-<p>.jsonl    one record per line: partition, offset, timestamp, key, value
    <uri>/<topic>/partition-<p>.parquet  the same columns; key and value as bytes

Values are kept byte for byte: JSONL stores the UTF-8 text of the original bytes under `value` (or
base64 under `value_b64` when they are not UTF-8); Parquet stores the bytes. Headers are not used by
sipstream and are not exported.

`import_export` produces the records back in offset order, each to the partition it came from (the
partition its key was assigned to), on the cluster and topic prefix of the given config. New offsets
differ in general, so it writes a new run directory holding the manifest and consumption log with
every offset translated (and the old → new map under `imported`): `sipstream replay learner --run`
on that directory replays on the new cluster.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import Producer

from sipstream.bus import topics as T
from sipstream.bus.client import producer_config
from sipstream.bus.embedded import resolve_bootstrap
from sipstream.bus.fetch import RecordFetcher, require_topics
from sipstream.errors import UserError
from sipstream.replay.source import ARCHIVE_DIR, EXPORT_NAME, recorded_config, stamp
from sipstream.runs import manifest as M
from sipstream.runs.consumption import LOG_NAME, read_log

Format = Literal["jsonl", "parquet"]


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as file:
        return json.loads(file.read())


def _write_bytes(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as file:
        file.write(data)


def _rows(messages: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for msg in messages:
        _, timestamp = msg.timestamp()
        rows.append({"partition": msg.partition(), "offset": msg.offset(), "timestamp": timestamp,
                     "key": msg.key(), "value": msg.value()})
    return rows


def _encode_jsonl(rows: list[dict[str, Any]]) -> bytes:
    lines = []
    for row in rows:
        out = {"partition": row["partition"], "offset": row["offset"], "timestamp": row["timestamp"]}
        for field in ("key", "value"):
            raw = row[field]
            try:
                out[field] = None if raw is None else raw.decode("utf-8")
            except UnicodeDecodeError:
                out[field] = None
                out[f"{field}_b64"] = base64.b64encode(raw).decode("ascii")
        lines.append(json.dumps(out, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _decode_jsonl(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for field in ("key", "value"):
            b64 = row.pop(f"{field}_b64", None)
            text = row.get(field)
            row[field] = base64.b64decode(b64) if b64 is not None else (None if text is None else text.encode("utf-8"))
        rows.append(row)
    return rows


def _encode_parquet(rows: list[dict[str, Any]]) -> bytes:

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "partition": pa.array([r["partition"] for r in rows], pa.int32()),
        "offset": pa.array([r["offset"] for r in rows], pa.int64()),
        "timestamp": pa.array([r["timestamp"] for r in rows], pa.int64()),
        "key": pa.array([r["key"] for r in rows], pa.binary()),
        "value": pa.array([r["value"] for r in rows], pa.binary()),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _decode_parquet(data: bytes) -> list[dict[str, Any]]:

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()


# --------------------------------------------------------------------------- export


def export_topic(topic: str, run: str | Path, to: str, *, fmt: Format = "jsonl", bootstrap: str | None = None,
                 bus: Any = None) -> dict[str, Any]:
    """Write `topic`'s recorded range of run `run` under `to`; returns the export's entry for the topic.

    The broker is checked first (reachable, holding the topic and its partitions): a failed export
    leaves no `<to>/<topic>/` folder behind."""
    return export_topics([topic], run, to, fmt=fmt, bootstrap=bootstrap, bus=bus)[topic]


@dataclass
class _TopicExport:
    """One topic to export: the manifest that recorded it (the pipeline's, or its learner's) and where it is."""

    topic: str
    run_dir: Path
    data: dict[str, Any]
    entry: dict[str, Any]
    bus: Any
    bootstrap: str
    folder: str = ""
    created: bool = False


def _plan(topic: str, run: str | Path, bootstrap: str | None, bus: Any) -> _TopicExport:
    run_dir, data = M.load_manifest(run)
    pipeline = data
    if topic not in data.get("topics", {}) and data.get("learner_run"):
        run_dir, data = M.learner_manifest(run_dir, data)  # e.g. sip.weights of a pipeline's learner
    entry = data.get("topics", {}).get(topic)
    if entry is None:
        raise UserError(f"run {run_dir} recorded no range of {topic}; it has: {', '.join(sorted(data.get('topics', {})))}")
    if bootstrap is None and pipeline.get("bus", {}).get("ephemeral"):
        where = run_dir / pipeline.get("archive", ARCHIVE_DIR)
        raise UserError(f"run {run_dir} ran on an in-memory broker that ended with it; its topics are already "
                        f"exported in {where} (copy that folder, or put it on a bus with `sipstream import {where}`)")
    return _TopicExport(topic, run_dir, data, entry, bus or recorded_config(data, run_dir).bus,
                        bootstrap or data["bus"]["bootstrap_servers"])


def _export_partition(plan: _TopicExport, partition: str, start: int, end: int, fs: Any, root: str,
                      fmt: Format) -> tuple[str, int]:
    """Read one partition's range with its own consumer and write its file; returns (file, records)."""
    fetcher = RecordFetcher(plan.bus, plan.bootstrap, plan.entry["live_name"])
    try:
        rows = _rows(fetcher.read_range(int(partition), start, end))
    finally:
        fetcher.close()
    name = f"{plan.topic}/partition-{int(partition)}.{fmt}"
    fs.makedirs(plan.folder, exist_ok=True)
    _write_bytes(fs, f"{root}/{name}", _encode_jsonl(rows) if fmt == "jsonl" else _encode_parquet(rows))
    return name, len(rows)


def export_topics(topics: list[str], run: str | Path, to: str, *, fmt: Format = "jsonl", bootstrap: str | None = None,
                  bus: Any = None, max_readers: int = 16) -> dict[str, dict[str, Any]]:
    """`export_topic` for several topics at once: returns {topic: its export entry}; the files are the same.

    Every partition is read at the same time (up to `max_readers`), each on its own thread with its own
    consumer: a fetch waits up to half a second for a full batch, so the 27 partitions of a `sipstream run`
    read one after another took most of the 14-19 s its record took at the stop (at once: ~1.2 s). The brokers are checked first; if any partition
    fails, no topic folder this call created is left behind and nothing is added to export.json."""
    if fmt not in ("jsonl", "parquet"):
        raise UserError(f"--format must be jsonl or parquet, not {fmt!r}")
    plans = [_plan(topic, run, bootstrap, bus) for topic in topics]
    for where in {plan.bootstrap for plan in plans}:  # one metadata request per cluster
        on_it = [plan for plan in plans if plan.bootstrap == where]
        wanted = {plan.entry["live_name"]: [int(p) for p in plan.entry["partitions"]] for plan in on_it}
        require_topics(on_it[0].bus, where, wanted, "export from the cluster that holds the run (--bootstrap-servers)")
    fs, root = _fs(to)
    for plan in plans:
        plan.folder = f"{root}/{plan.topic}"
        plan.created = not fs.exists(plan.folder)
    jobs = [(plan, partition, start, end) for plan in plans
            for partition, (start, end) in sorted(plan.entry["partitions"].items(), key=lambda kv: int(kv[0]))]
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(max_readers, len(jobs))), thread_name_prefix="export") as pool:
            done = [pool.submit(_export_partition, plan, partition, start, end, fs, root, fmt)
                    for plan, partition, start, end in jobs]
            results = [future.result() for future in done]
        for plan in plans:
            fs.makedirs(plan.folder, exist_ok=True)  # an empty folder: archived, no records (e.g. no dead letters)
    except BaseException:
        for plan in plans:
            if plan.created and fs.exists(plan.folder):
                fs.rm(plan.folder, recursive=True)  # no half-written topic beside complete ones
        raise
    entries = {}
    for plan in plans:
        mine = [result for (owner, *_), result in zip(jobs, results, strict=True) if owner is plan]
        entries[plan.topic] = _write_index(plan, fs, root, fmt, [name for name, _ in mine], sum(n for _, n in mine))
    return entries


def _write_index(plan: _TopicExport, fs: Any, root: str, fmt: Format, files: list[str], count: int) -> dict[str, Any]:
    """The run's own record beside the data, and the topic's entry in export.json; returns that entry."""
    run_dir, data, entry = plan.run_dir, plan.data, plan.entry
    # The run's own record travels with the data, so an import can rebuild a replayable run; a
    # pipeline run's learner (manifest and consumption log) goes to learner/.
    fs.makedirs(root, exist_ok=True)
    _write_bytes(fs, f"{root}/{M.MANIFEST_NAME}", json.dumps(data, indent=1).encode())
    learner_dir = run_dir if data.get("kind") == "learner" else (
        run_dir / data["learner_run"] if data.get("learner_run") else None)
    if learner_dir is not None and (learner_dir / M.MANIFEST_NAME).is_file():
        sub = "" if learner_dir == run_dir else "learner/"
        if sub:
            fs.makedirs(f"{root}/learner", exist_ok=True)
            _write_bytes(fs, f"{root}/{sub}{M.MANIFEST_NAME}", (learner_dir / M.MANIFEST_NAME).read_bytes())
        log_path = learner_dir / LOG_NAME
        if log_path.is_file():
            _write_bytes(fs, f"{root}/{sub}{LOG_NAME}", log_path.read_bytes())
    index = _read_json(fs, f"{root}/{EXPORT_NAME}") or {"format": M.FORMAT, "run_name": data["run_name"], "topics": {}}
    index["topics"][plan.topic] = {"format": fmt, "live_name": entry["live_name"], "partitions": entry["partitions"],
                                   "records": count, "files": files, "exported_at": M.now()}
    _write_bytes(fs, f"{root}/{EXPORT_NAME}", json.dumps(index, indent=1).encode())
    return index["topics"][plan.topic]


# --------------------------------------------------------------------------- import


def translate_offset(offset_map: dict[int, dict[int, int]], topic: str, partition: int, offset: int) -> int:
    try:
        return offset_map[partition][offset]
    except KeyError:
        raise UserError(f"the run recorded {topic} partition {partition} offset {offset}, which is not in the export; "
                        f"export {topic} again from the original cluster") from None


def _segments(mapping: dict[int, int]) -> list[list[int]]:
    """{old: new} as [old_start, count, new_start] runs (contiguous on both sides)."""
    out: list[list[int]] = []
    for old in sorted(mapping):
        if out and old == out[-1][0] + out[-1][1] and mapping[old] == out[-1][2] + out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([old, 1, mapping[old]])
    return out


def read_export(source: str) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """(filesystem, root, export.json, manifest) of an export folder; one-line errors for anything else."""
    fs, root = _fs(source)
    index = _read_json(fs, f"{root}/{EXPORT_NAME}")
    if index is None:
        raise UserError(f"no {EXPORT_NAME} under {source}: pass a directory written by `sipstream export` "
                        f"(or the {ARCHIVE_DIR}/ folder of a `sipstream run` directory)")
    data = _read_json(fs, f"{root}/{M.MANIFEST_NAME}")
    if data is None:
        raise UserError(f"{source} holds no {M.MANIFEST_NAME}; export again with this sipstream version")
    return fs, root, index, data


def put_back(source: str, cfg: Any, bootstrap: str, topics: list[str] | None = None) -> dict[str, dict[int, dict[int, int]]]:
    """Produce an export's records (all its topics, or `topics`) onto `bootstrap` under `cfg.bus.topic_prefix`,
    each to the partition it came from, in offset order; returns {topic: {partition: {old offset: new}}}."""


    fs, root, index, _ = read_export(source)
    wanted = sorted(index["topics"]) if topics is None else list(topics)
    missing = [t for t in wanted if t not in index["topics"]]
    if missing:
        raise UserError(f"{source} holds no {', '.join(missing)} (it has {', '.join(sorted(index['topics']))}); "
                        "export it from the run's cluster")
    specs = T.load_specs(T.topics_dir(cfg.bus))
    unknown = [t for t in wanted if t not in specs]
    if unknown:
        raise UserError(f"{source} holds topic {unknown[0]}, which has no spec in topics/")
    T.create_topics(cfg.bus, bootstrap, {n: specs[n] for n in wanted})

    maps: dict[str, dict[int, dict[int, int]]] = {}
    failures: list[str] = []
    producer = Producer(producer_config(cfg.bus, bootstrap, client_id="sipstream-import"))
    for topic in wanted:
        entry = index["topics"][topic]
        live = cfg.bus.topic(topic)
        topic_map = maps.setdefault(topic, {})
        for name in entry["files"]:
            with fs.open(f"{root}/{name}", "rb") as file:
                raw = file.read()
            rows = _decode_jsonl(raw) if entry["format"] == "jsonl" else _decode_parquet(raw)
            for row in sorted(rows, key=lambda r: r["offset"]):
                partition = row["partition"]
                if partition >= specs[topic].partitions:
                    raise UserError(f"{topic} partition {partition} does not exist on the target ({specs[topic].partitions} "
                                    "partitions); create the topic with at least as many partitions as the original")

                def delivered(err: Any, msg: Any, old: int = row["offset"], p: int = partition,
                              into: dict[int, dict[int, int]] = topic_map) -> None:
                    if err is not None:
                        failures.append(f"{msg.topic()}[{p}]@{old}: {err.str()}")
                    else:
                        into.setdefault(p, {})[old] = msg.offset()

                # The original partition, explicitly: the same key lands where it was, whatever the
                # target cluster's default partitioner is.
                producer.produce(live, value=row["value"], key=row["key"], partition=partition,
                                 timestamp=row.get("timestamp") or 0, on_delivery=delivered)
                producer.poll(0)
    remaining = producer.flush(60)
    if remaining or failures:
        raise UserError(f"import into {bootstrap}: {remaining} record(s) unacknowledged, failures: {failures[:3]}")
    return maps


def import_export(source: str, cfg: Any, bootstrap: str | None = None, *, run_dir: str | Path | None = None) -> Path:
    """Produce an export's records onto the cluster at `bootstrap` (default: the one `cfg` names; topics
    under `cfg.bus.topic_prefix`) and write a replayable run directory with translated offsets; returns
    that directory. The export is read before the broker is looked for."""
    fs, root, _, data = read_export(source)
    if bootstrap is None:

        bootstrap = resolve_bootstrap(cfg)
    maps = put_back(source, cfg, bootstrap)

    # A replayable run on the new cluster: the manifest and consumption log, offsets translated.

    out = Path(run_dir) if run_dir else Path(cfg.run_dir) / f"{data['run_name']}-import-{stamp()}"
    imported = {"from": source, "at": M.now(), "original_bus": data.get("bus"),
                "offset_map": {t: {str(p): _segments(m) for p, m in sorted(pm.items())} for t, pm in maps.items()}}
    _restore_run(fs, root, "", data, out, maps, cfg, bootstrap, imported)
    learner = _read_json(fs, f"{root}/learner/{M.MANIFEST_NAME}")
    if learner is not None:  # a pipeline run's learner, beside it as in the original
        _restore_run(fs, root, "learner/", learner, out / learner["run_name"], maps, cfg, bootstrap, imported)
        data["learner_run"] = learner["run_name"]
        M.write_json(out / M.MANIFEST_NAME, data)
    return out


def _restore_run(fs: Any, root: str, sub: str, data: dict[str, Any], out: Path, maps: dict[str, dict[int, dict[int, int]]],
                 cfg: Any, bootstrap: str, imported: dict[str, Any]) -> None:
    """Write `data` (a run manifest) and its consumption log under `out`, every offset translated."""
    out.mkdir(parents=True, exist_ok=True)
    for topic, entry in data.get("topics", {}).items():
        if topic not in maps:
            entry["not_imported"] = True  # still names the old cluster's range
            continue
        entry["live_name"] = cfg.bus.topic(topic)
        entry["partitions"] = {
            p: [translate_offset(maps[topic], topic, int(p), s), translate_offset(maps[topic], topic, int(p), e - 1) + 1]
            for p, (s, e) in entry["partitions"].items()}
    data["bus"] = {"bootstrap_servers": bootstrap, "topic_prefix": cfg.bus.topic_prefix}
    data.pop("archive", None)  # the records are on `bootstrap` now
    data["config"]["bus"] = {**data["config"]["bus"], "bootstrap_servers": bootstrap,
                             "topic_prefix": cfg.bus.topic_prefix, "group_prefix": cfg.bus.group_prefix}
    data["imported"] = imported
    if data.get("kind") == "learner" and fs.exists(f"{root}/{sub}{LOG_NAME}"):
        pairs_map = maps.get(T.PAIRS)
        if pairs_map is None:
            raise UserError(f"the export holds a learner run but not {T.PAIRS}; export {T.PAIRS} too")
        scratch = out / f".{LOG_NAME}.orig"
        with fs.open(f"{root}/{sub}{LOG_NAME}", "rb") as file:
            scratch.write_bytes(file.read())
        entries = read_log(scratch)
        scratch.unlink()
        with open(out / LOG_NAME, "w", encoding="utf-8") as file:
            for e in entries:
                e["records"] = [[p, translate_offset(pairs_map, T.PAIRS, p, o)] for p, o in e["records"]]
                file.write(json.dumps(e, separators=(",", ":")) + "\n")
    M.write_json(out / M.MANIFEST_NAME, data)
