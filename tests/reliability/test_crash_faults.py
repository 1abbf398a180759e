"""Crash faults: kill -9 of a stage worker mid-batch, of the learner mid-run and of the broker (durable s3://
engine on a local moto server), all in one `sipstream run`; afterwards every ingested item reached sip.pairs
exactly once after dedupe, the learner trained no pair twice and skipped none, and no record was lost.

Scope kept apart (not repeated here): the learner's bit-exact resume after kill -9 is
tests/integration/learner/test_learner_on_bus.py; one killed worker of every stage with two workers per
stage is tests/integration/test_run_local.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker, free_port
from sipstream.config import EmbeddedBrokerConfig, project_root

DOCUMENTS = 6  # smoke.yaml cuts at most 2 items per document


def pids_of(*needles: str) -> list[int]:
    """Processes whose command line holds every needle (reads /proc; Linux)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(n in cmdline for n in needles):
                pids.append(int(proc.name))
    return pids


def read_topic(bootstrap: str, topic: str, partitions: int, quiet_s: float = 3.0) -> list[dict]:
    """Every record of a topic, read to the end (the s3 engine's high watermark is wrong: no watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reliability-reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out, quiet_since = [], time.monotonic()
    try:
        while time.monotonic() - quiet_since < quiet_s:
            batch = [m for m in consumer.consume(500, timeout=0.3) if m.error() is None]
            if batch:
                quiet_since = time.monotonic()
            out.extend({"partition": m.partition(), "offset": m.offset(), "value": json.loads(m.value())} for m in batch)
    finally:
        consumer.close()
    return out


@pytest.mark.slow
def test_kill_9_of_a_worker_the_learner_and_the_s3_broker_loses_nothing(tmp_path: Path, moto_s3, s3_bucket, figures) -> None:
    storage = s3_bucket("tansu-crash")
    env = {**os.environ, **moto_s3, "SIPSTREAM_HOME": str(tmp_path)}
    broker_cfg = EmbeddedBrokerConfig(port=free_port(), storage=storage)
    broker = EmbeddedBroker(broker_cfg, env=env)
    bootstrap = broker.start()
    stderr = open(tmp_path / "run.stderr", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "run", "--config", str(project_root() / "configs" / "smoke.yaml"),
         "--max-documents", str(DOCUMENTS), "--set", f"run_dir={tmp_path}", "--set", f"bus.bootstrap_servers={bootstrap}",
         "--set", "local.max_restarts=6", "--set", "runner.batch_size=4",
         # Torch's own thread count per child (2 here), not `sipstream run`'s one-per-process share: with one
         # thread each the tiny models finish the whole run inside the supervisor's first ~15 s status read,
         # before any status line shows the run in flight, and no fault could be injected mid-run.
         "--set", "local.threads_per_process=2"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    faults: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and "broker" not in faults and proc.poll() is None:
            status = [re.search(r"items (\d+) \|.*rollout (\d+) \(lag (\d+)\).*assemble (\d+) ", line) for _, line in lines]
            status = [tuple(int(g) for g in m.groups()) for m in status if m]
            run_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
            # Mid-run: rollout has written its first records, more are on their way, not every item is paired.
            # All three faults at once, so the recovery of each overlaps the others'.
            if run_dirs and status and status[-1][1] > 0 and status[-1][3] < status[-1][0]:
                mine = f"{run_dirs[0]}/config.yaml"
                for name, needle in (("rollout", "worker rollout"), ("learner", "sipstream learner")):
                    for pid in pids_of(mine, needle):
                        os.kill(pid, signal.SIGKILL)
                        faults[name] = time.monotonic()
                broker.kill()  # SIGKILL: whatever it had not written to s3 is gone
                faults["broker"] = time.monotonic()
                time.sleep(1.0)
                broker = EmbeddedBroker(broker_cfg, env=env)
                broker.start()  # same port, same bucket
                faults["broker_back"] = time.monotonic()
            time.sleep(0.2)
        assert proc.wait(timeout=300) == 0, "".join(l for _, l in lines)[-2000:] + (tmp_path / "run.stderr").read_text()[-3000:]
        reader.join(10)
        assert {"rollout", "learner", "broker"} <= set(faults), (f"faults injected: {sorted(faults)}; the run ended first; its status lines:\n"
                                                     + "".join(line for _, line in lines if line.startswith("items"))[-3000:])

        # `sipstream run` stops once every item reached sip.pairs, with the learner's last partial step untrained
        # (by design: re-read after a restart). Restart the learner once more from its checkpoint to drain.
        (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
        drain = subprocess.run(
            [sys.executable, "-m", "sipstream", "learner", "--config", str(run_dir / "config.yaml"),
             "--bootstrap-servers", bootstrap, "--set", "learner.idle_timeout_s=3"],
            capture_output=True, text=True, env=env, check=False, timeout=120,
        )
        assert drain.returncode == 0, drain.stdout[-1000:] + drain.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        specs = T.load_specs()
        prefixes = read_topic(bootstrap, T.PREFIXES, specs[T.PREFIXES].partitions)
        pairs = read_topic(bootstrap, T.PAIRS, specs[T.PAIRS].partitions)
        documents = read_topic(bootstrap, T.DOCUMENTS, specs[T.DOCUMENTS].partitions)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr.close()
        broker.stop()

    # No record lost: every ingested document, every item, one pair per item (after dedupe by item_id).
    items = {r["value"]["item_id"] for r in prefixes}
    pair_ids = Counter(r["value"]["item_id"] for r in pairs)
    assert len({r["value"]["doc_id"] for r in documents}) == DOCUMENTS
    assert len(items) == 2 * DOCUMENTS and set(pair_ids) == items
    assert summary["items"] == summary["completed"] == 2 * DOCUMENTS and summary["deadlettered"] == 0
    assert summary["restarts"]["rollout"] >= 1  # restarted by `sipstream run`'s supervisor

    # The learner: every distinct pair looked at, none trained twice, none skipped except for a stated reason.
    by_position = {(r["partition"], r["offset"]): r["value"] for r in pairs}
    log = [json.loads(line) for line in (run_dir / "smoke" / "consumption.jsonl").read_text().splitlines()]
    looked_at = [by_position[tuple(rec)]["item_id"] for entry in log for rec in entry["records"]]
    trained = Counter(by_position[tuple(entry["records"][i])]["item_id"] for entry in log for i in entry["trained"])
    untrainable = {i for i in items if not any(p["value"]["item_id"] == i and p["value"]["chosen"] and p["value"]["rejected"]
                                               for p in pairs)}  # ties: no DPO pair by design
    assert set(looked_at) == items
    assert max(trained.values()) == 1, [i for i, n in trained.items() if n > 1]
    assert set(trained) == items - untrainable

    # Recovery: from the broker's restart to the next item reaching sip.pairs (the run's status line).
    paired = [(t, int(m.group(1))) for t, line in lines if (m := re.search(r"assemble (\d+) ", line))]
    before = max((n for t, n in paired if t <= faults["broker"]), default=0)
    first_pair_after = next((t for t, n in paired if t > faults["broker_back"] and n > before), None)
    figures(
        "crash_faults",
        documents_in=DOCUMENTS, items_in=len(items), pairs_out_distinct=len(pair_ids),
        pair_records_on_topic=sum(pair_ids.values()), duplicates_removed=sum(pair_ids.values()) - len(pair_ids),
        learner_records_looked_at=len(looked_at), learner_trained=sum(trained.values()),
        learner_skipped_tie=len(untrainable), restarts={k: v for k, v in summary["restarts"].items() if v},
        broker_down_s=round(faults["broker_back"] - faults["broker"], 2),
        recovery_s=None if first_pair_after is None else round(first_pair_after - faults["broker_back"], 2),
        run_s=round(summary["seconds"], 1),
    )
