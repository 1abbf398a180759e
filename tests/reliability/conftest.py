"""Fixtures of the reliability scenarios (README.md here): the shared embedded broker and `bus` come from
tests/conftest.py; this adds a local S3 (moto_server) for the durable broker engine, a misbehaving model
server, and `figures`, which prints a scenario's numbers and records them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FIGURES_FILE = "reliability-figures.json"


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process now (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


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
def process_rss():
    """`process_rss(pid=None)`: resident memory of a process (default: this one) in MiB."""
    return rss_mb


def make_bucket(env: dict[str, str], name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"]
                 ).create_bucket(Bucket=name)


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
