"""Shared fixtures. Integration tests talk to one real embedded Tansu broker per session; each test
gets its own topic prefix and consumer groups, so tests never see each other's records."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Never reach a model hub from tests: weights come from packages or are built in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A local S3 API (moto_server on 127.0.0.1) for the session; each test makes its own buckets."""
    import subprocess
    import sys
    from pathlib import Path

    from sipstream.bus.broker import free_port, port_open

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port, timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"moto_server did not listen on 127.0.0.1:{port} within 20 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="session")
def broker() -> Iterator[Any]:
    from sipstream.bus.broker import EmbeddedBroker

    b = EmbeddedBroker()
    b.start()
    yield b
    b.stop()


@dataclass
class Bus:
    """A test's view of the broker: its config (own topic prefix) plus small produce/read helpers."""

    cfg: Any
    bootstrap: str

    def topic(self, name: str) -> str:
        return self.cfg.bus.topic(name)

    def produce(self, name: str, values: list[Any], key: str | None = None) -> None:
        """Produce values (dict → JSON, bytes as they are) to the topic specified as `name`."""
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})
        for value in values:
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            k = key if key is not None else (value.get("doc_id") if isinstance(value, dict) else None)
            producer.produce(self.topic(name), value=raw, key=None if k is None else str(k).encode())
        assert producer.flush(30) == 0

    def read(self, name: str, expect: int | None = None, timeout: float = 20.0) -> list[Any]:
        """All records of a topic from the beginning (assign(), no group): a list of messages.

        Stops at `expect` records, or after 1 s without new records (when `expect` is None)."""
        from confluent_kafka import Consumer, TopicPartition

        from sipstream.bus.topics import load_specs

        partitions = load_specs()[name].partitions
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "test-reader", "enable.auto.commit": False})
        consumer.assign([TopicPartition(self.topic(name), p, 0) for p in range(partitions)])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        try:
            while time.monotonic() < deadline:
                if expect is not None and len(out) >= expect:
                    break
                msgs = consumer.consume(500, timeout=0.2)
                msgs = [m for m in msgs if m.error() is None]
                if msgs:
                    out.extend(msgs)
                    quiet_since = time.monotonic()
                elif expect is None and time.monotonic() - quiet_since > 1.0:
                    break
        finally:
            consumer.close()
        return out

    def values(self, name: str, expect: int | None = None, timeout: float = 20.0) -> list[dict]:
        return [json.loads(m.value()) for m in self.read(name, expect, timeout)]


@pytest.fixture
def bus(broker: Any) -> Bus:
    from sipstream.bus import topics as T
    from sipstream.config import load_config

    prefix = f"t{uuid.uuid4().hex[:10]}."
    cfg = load_config(
        overrides=[
            f"bus.bootstrap_servers={broker.bootstrap_servers}",
            f"bus.topic_prefix={prefix}",
            f"bus.group_prefix={prefix}group",
            "runner.batch_size=8",
            "runner.batch_timeout_s=0.2",
            "runner.metrics_interval_s=1",
        ],
        env={},
    )
    T.create_topics(cfg.bus, broker.bootstrap_servers, T.load_specs())
    return Bus(cfg, broker.bootstrap_servers)


def make_docs(n: int, tag: str = "d") -> list[dict]:
    return [{"doc_id": f"{tag}{i:05d}", "text": f"document {i} text", "source": "test"} for i in range(n)]


@pytest.fixture
def docs():
    return make_docs


FIGURES_FILE = "reliability-figures.json"


@pytest.fixture
def figures(request: pytest.FixtureRequest, record_property: Any, tmp_path_factory: pytest.TempPathFactory):
    """`figures(scenario, **numbers)`: print one line (seen with -s / -rA), attach the numbers to the test's
    report (JUnit XML properties) and append them to <pytest basetemp>/reliability-figures.json."""

    def report(scenario: str, **numbers: Any) -> None:
        print(f"[reliability] {scenario}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)
        for key, value in numbers.items():
            record_property(f"{scenario}.{key}", value)
        path = tmp_path_factory.getbasetemp() / FIGURES_FILE
        existing = json.loads(path.read_text()) if path.exists() else []
        existing.append({"test": request.node.nodeid, "scenario": scenario, **numbers})
        path.write_text(json.dumps(existing, indent=2))

    return report
