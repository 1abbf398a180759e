"""The faust variant of the echo stage (benchmarks/faust_echo.py, issue 3) against the embedded broker:
it echoes documents, dead-letters a malformed one without stopping the stream, and exits on SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipstream.bus import topics as T

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("faust", reason="the faust comparison needs faust-streaming")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_faust_echo_agent_echoes_and_dead_letters(bus, docs) -> None:
    good = docs(20)
    # All on one partition, the bad record in the middle: the records after it must still be echoed.
    values = [*good[:10], b'{"doc_id": "broken", "text": ', *good[10:]]
    bus.produce(T.DOCUMENTS, values, key="same-partition")
    cmd = [sys.executable, "-m", "benchmarks.faust_echo", "--bootstrap", bus.bootstrap,
           "--topic-prefix", bus.cfg.bus.topic_prefix, "--group-prefix", bus.cfg.bus.group_prefix,
           "--batch-size", "8", "--within", "0.2", "--commit-per-batch"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "SIPSTREAM_HOME": "/nonexistent"})
    try:
        deadline = time.monotonic() + 40
        echoed: list[dict] = []
        while time.monotonic() < deadline and len(echoed) < 20:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            echoed = bus.values(T.ECHO, expect=20, timeout=2.0)
        dead = bus.values(T.DEADLETTER, expect=1, timeout=5.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()

    assert sorted(v["doc_id"] for v in echoed) == sorted(d["doc_id"] for d in good), out[-2000:]
    assert all(v["echoed_by"].startswith("echo-faust-") for v in echoed)
    assert len(dead) == 1, out[-2000:]
    assert dead[0]["error"] == "bad_json"
    assert base64.b64decode(dead[0]["value_b64"]) == values[10]
    assert T.load_specs()[T.DEADLETTER].errors(dead[0]) == []
    assert proc.returncode == 0, out[-2000:]
    assert '"processed": 20' in out and '"deadlettered": 1' in out, out[-2000:]
    json.loads(out.split("faust echo stopped ", 1)[1].splitlines()[0])  # the final counters line parses
