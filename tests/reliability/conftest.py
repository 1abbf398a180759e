"""Fixtures of the reliability scenarios (README.md here): the shared embedded broker, `bus` and `figures` (prints
a scenario's numbers and records them) come from tests/conftest.py; this adds the AWS environment of the local S3
(moto_server) for the durable broker engine, and readers of a process's memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process now (Linux /proc), in MiB."""
    return _status_mb(pid or os.getpid(), "VmRSS")


class PeakMemory:
    """The peak resident memory of a process from `start()` on, not its memory at the end.

    The kernel keeps the peak (VmHWM); writing 5 to /proc/<pid>/clear_refs resets it to the current RSS (Linux
    4.0+, our own processes), so VmHWM read later is the peak of this window. Where the reset is refused, a thread
    samples VmRSS every 5 ms instead (`method` says which)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.baseline_mb = 0.0
        self.method = ""
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        self.baseline_mb = rss_mb(self.pid)
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled every 5 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self._samples.append(rss_mb(self.pid))
            except (OSError, RuntimeError):
                return

    def peak_mb(self) -> float:
        """The peak so far (the process must still be alive)."""
        if self.method == "VmHWM":
            return _status_mb(self.pid, "VmHWM")
        return max([self.baseline_mb, *self._samples])

    def growth_mb(self) -> float:
        return self.peak_mb() - self.baseline_mb

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)


@pytest.fixture(scope="session")
def moto_s3(moto_endpoint: str) -> dict[str, str]:
    """The AWS_* environment that points Tansu and s3fs at the session's local S3 (tests/conftest.py)."""
    return {"AWS_ENDPOINT": moto_endpoint, "AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "reliability",
            "AWS_SECRET_ACCESS_KEY": "reliability-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


@pytest.fixture
def s3_bucket(moto_s3: dict[str, str]):
    """`s3_bucket(name)` creates a bucket on the local S3 and returns its `s3://name/` URL."""

    def make(name: str) -> str:
        make_bucket(moto_s3, name)
        return f"s3://{name}/"

    return make


@pytest.fixture
def peak_memory():
    """`peak_memory(pid=None)`: a started `PeakMemory` of a process (default: this one); stopped at teardown."""
    started: list[PeakMemory] = []

    def start(pid: int | None = None) -> PeakMemory:
        started.append(PeakMemory(pid).start())
        return started[-1]

    yield start
    for meter in started:
        meter.stop()


def make_bucket(env: dict[str, str], name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"]
                 ).create_bucket(Bucket=name)
