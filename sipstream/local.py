"""`sipstream run`: the whole loop on one machine.

Starts the embedded broker (unless a cluster is configured), creates the topics, starts every stage
as its own local `sipstream worker` process (as in a deployment, one process per stage), ingests the
shipped public-domain corpus, follows the records to the last topic, then stops the workers
(SIGTERM: each finishes its batch and commits) and the broker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker
from sipstream.config import Config
from sipstream.errors import UserError
from sipstream.logs import get_logger

# The stages `sipstream run` starts, in pipeline order, and the topic whose records mark an item done.
PIPELINE: tuple[str, ...] = ("echo",)
FINAL_TOPIC = T.ECHO


@dataclass
class LocalRunResult:
    ingested: int = 0
    completed: int = 0
    deadlettered: int = 0
    seconds: float = 0.0
    workers_exit_codes: dict[str, int] = field(default_factory=dict)


def _count_topic(bootstrap: str, topic: str, partitions: int, key_field: str) -> tuple[set[str], int]:
    """Distinct keys and record count in a topic, read from the beginning with assign() (no group join)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "sipstream-run-watch", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        keys: set[str] = set()
        count = 0
        idle = 0
        while idle < 2:
            batch = consumer.consume(500, timeout=0.2)
            if not batch:
                idle += 1
                continue
            idle = 0
            for msg in batch:
                if msg.error() is None:
                    count += 1
                    keys.add(str(json.loads(msg.value()).get(key_field)))
        return keys, count
    finally:
        consumer.close()


def run_local(cfg: Config, documents: list[dict] | None = None, timeout_s: float = 3600.0) -> LocalRunResult:
    from rich.progress import Progress

    from sipstream.ingest import produce_documents

    log = get_logger(component="run")
    result = LocalRunResult()
    started = time.monotonic()
    broker = None
    workers: dict[str, subprocess.Popen[bytes]] = {}
    specs = T.load_specs(T.topics_dir(cfg.bus))
    if documents is None:
        from sipstream.data import load_corpus

        documents = load_corpus()
    try:
        bootstrap = cfg.bus.bootstrap_servers
        if bootstrap is None:
            broker = EmbeddedBroker(cfg.bus.embedded)
            bootstrap = broker.start()
            print(f"embedded broker at {bootstrap}", flush=True)
        T.create_topics(cfg.bus, bootstrap, specs)

        # Workers get the resolved config, so --set and env overrides reach them too.
        cfg_file = Path(tempfile.mkstemp(prefix="sipstream-run-", suffix=".yaml")[1])
        cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        for stage in PIPELINE:
            workers[stage] = subprocess.Popen(
                [sys.executable, "-m", "sipstream", "worker", stage, "--config", str(cfg_file), "--bootstrap-servers", bootstrap]
            )

        result.ingested = produce_documents(cfg.bus, bootstrap, documents)
        print(f"ingested {result.ingested} documents; stages: {' → '.join(PIPELINE)}", flush=True)
        expected = {d["doc_id"] for d in documents}
        deadline = time.monotonic() + timeout_s
        with Progress(transient=True) as progress:
            task = progress.add_task(f"items reaching {FINAL_TOPIC}", total=len(expected))
            while True:
                done, _ = _count_topic(bootstrap, cfg.bus.topic(FINAL_TOPIC), specs[FINAL_TOPIC].partitions, "doc_id")
                _, dead = _count_topic(bootstrap, cfg.bus.topic(T.DEADLETTER), specs[T.DEADLETTER].partitions, "offset")
                progress.update(task, completed=len(done & expected))
                result.completed, result.deadlettered = len(done & expected), dead
                if result.completed + result.deadlettered >= len(expected):
                    break
                crashed = {s: p.returncode for s, p in workers.items() if p.poll() is not None}
                if crashed:
                    raise UserError(f"worker(s) exited early: {crashed}; see their log lines above")
                if time.monotonic() > deadline:
                    raise UserError(f"run timed out after {timeout_s:.0f}s with {result.completed}/{len(expected)} done")
                time.sleep(1.0)
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for stage, proc in workers.items():
            try:
                result.workers_exit_codes[stage] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                result.workers_exit_codes[stage] = proc.wait()
        if broker is not None:
            broker.stop()
    result.seconds = time.monotonic() - started
    log.info("run finished", **result.__dict__)
    print(
        f"done: {result.completed}/{result.ingested} documents reached {FINAL_TOPIC}, "
        f"{result.deadlettered} dead-lettered, {result.seconds:.1f}s",
        flush=True,
    )
    return result
