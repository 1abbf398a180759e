"""The command line as a user meets it: help everywhere, one clear line for user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = [[], ["broker"], ["worker"], ["topics"], ["topics", "create"], ["topics", "list"],
            ["topics", "describe"], ["topics", "sync"], ["config"], ["run"], ["ingest"], ["learner"]]


def sipstream(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sipstream", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SIPSTREAM_HOME": "/nonexistent", **(env or {})})


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "sipstream")
def test_every_command_has_help(command: list[str]) -> None:
    result = sipstream(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: sipstream" in result.stdout
    if command:
        assert "--config" in result.stdout or "Commands" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["config", "--set", "runner.batch_size=0"], {}, "runner.batch_size: Input should be greater than or equal to 1"),
        (["config", "--config", "/no/such.yaml"], {}, "config file not found: /no/such.yaml"),
        (["config"], {"SIPSTREAM_RUNER__BATCH_SIZE": "3"}, "runer: unknown field"),
        (["worker", "nope"], {}, "unknown stage 'nope'; choose from: assemble, echo, judge, rewrite, rollout, split"),
        (["topics", "list"], {}, "no broker: start one with `sipstream broker`"),
        (["topics", "list", "-b", "127.0.0.1:1"], {}, "no Kafka broker answered at 127.0.0.1:1"),
        (["broker", "--storage", "sqlite://x"], {}, "unsupported embedded storage 'sqlite://x'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], env: dict, message: str) -> None:
    result = sipstream(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_show_prints_the_resolved_config() -> None:
    result = sipstream("config", "--set", "rollout.rollouts=16", env={"SIPSTREAM_RUNNER__BATCH_SIZE": "3"})
    assert result.returncode == 0, result.stderr
    assert "rollouts: 16" in result.stdout and "batch_size: 3" in result.stdout
