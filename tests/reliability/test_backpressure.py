"""Back-pressure: documents are ingested far faster than a stage can process them (the echo stage with a
per-record delay standing in for model time, in its own `sipstream worker` process). The backlog (lag) grows,
the worker's memory does not grow with it (the consumer prefetches a bounded amount; the rest waits in the
broker), nothing is dropped, and the worker catches up: every record accounted for. Memory is the worker's peak
over the whole backlog (the kernel's high-water mark, reset once the worker is idle), not its size at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from sipstream.bus import topics as T
from sipstream.bus.tail import TopicTail
from sipstream.ops.ingest import produce_documents

DOCUMENTS = 4000
DOC_BYTES = 8 * 1024  # 32 MiB of backlog in all
RSS_GROWTH_LIMIT_MB = 120  # librdkafka's prefetch queue (64 MiB by default) plus the produce side


@pytest.mark.slow
def test_ingest_faster_than_processing_lag_grows_memory_does_not_nothing_is_dropped(bus, peak_memory, figures) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-m", "sipstream", "worker", "echo", "--bootstrap-servers", bus.bootstrap,
         "--set", f"bus.topic_prefix={bus.cfg.bus.topic_prefix}", "--set", f"bus.group_prefix={bus.cfg.bus.group_prefix}",
         "--set", "runner.batch_size=50", "--set", "runner.batch_timeout_s=0.2", "--set", "stages.echo.delay_s=0.001"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "SIPSTREAM_HOME": "/nonexistent"},
    )
    echoed = TopicTail(bus.bootstrap, bus.topic(T.ECHO), T.load_specs()[T.ECHO].partitions, id_field=None)
    keys: Counter[bytes] = Counter()
    try:
        # The worker is up and idle: its baseline memory.
        bus.produce(T.DOCUMENTS, [{"doc_id": "warmup", "text": "w", "source": "t"}])
        deadline = time.monotonic() + 60
        while echoed.count < 1:
            assert time.monotonic() < deadline and worker.poll() is None, worker.stderr.read()[-2000:] if worker.poll() else "slow"
            echoed.poll(0.5)
        memory = peak_memory(worker.pid)  # from here on: the peak while the backlog builds and drains

        filler = "x" * DOC_BYTES
        documents = ({"doc_id": f"bp{i:05d}", "text": f"{i} {filler}", "source": "load"} for i in range(DOCUMENTS))
        started = time.monotonic()
        ingested = produce_documents(bus.cfg.bus, bus.bootstrap, documents).ingested
        ingest_s = time.monotonic() - started

        max_lag = 0
        while echoed.count < DOCUMENTS + 1 and time.monotonic() - started < 120:
            echoed.poll(0.3)
            max_lag = max(max_lag, ingested + 1 - echoed.count)
        catch_up_s = time.monotonic() - started
        peak_mb = memory.peak_mb()  # read while the worker is alive
        keys = Counter(m.key() for m in bus.read(T.ECHO, expect=DOCUMENTS + 1, timeout=30))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        echoed.close()

    assert ingested == DOCUMENTS
    assert max_lag > DOCUMENTS // 2  # ingest outran processing: the backlog really built up
    assert peak_mb - memory.baseline_mb < RSS_GROWTH_LIMIT_MB
    assert set(keys) == {f"bp{i:05d}".encode() for i in range(DOCUMENTS)} | {b"warmup"}  # nothing dropped
    assert sum(keys.values()) == DOCUMENTS + 1 and worker.returncode == 0  # graceful stop, no duplicates
    figures("backpressure", records_in=DOCUMENTS, backlog_mib=round(DOCUMENTS * DOC_BYTES / 2**20), records_out=len(keys) - 1,
            duplicates=sum(keys.values()) - len(keys), max_lag=max_lag, ingest_s=round(ingest_s, 2),
            catch_up_s=round(catch_up_s, 1), worker_rss_baseline_mb=round(memory.baseline_mb),
            worker_rss_peak_mb=round(peak_mb), peak_from=memory.method)
