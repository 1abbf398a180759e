"""The command line as a user meets it: help everywhere, one clear line for user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = [[], ["broker"], ["worker"], ["topics"], ["topics", "create"], ["topics", "list"],
            ["topics", "describe"], ["topics", "sync"], ["config"], ["run"], ["ingest"], ["learner"],
            ["replay"], ["replay", "learner"], ["replay", "stage"], ["export"], ["import"]]


def sipstream(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sipstream", *args], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "SIPSTREAM_HOME": "/nonexistent", **(env or {})})


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "sipstream")
def test_every_command_has_help(command: list[str]) -> None:
    result = sipstream(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: sipstream" in result.stdout
    if command:
        # Commands that read a recorded run take --run (its config is recorded) instead of --config.
        assert "--config" in result.stdout or "Commands" in result.stdout or "--run" in result.stdout


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
        (["replay", "learner"], {}, "replay learner needs --run RUN_DIR"),
        (["replay", "learner", "--run", "/no/run"], {}, "no manifest.json in /no/run"),
        (["replay", "learner", "--run", "/no/run", "--algo", "sgd"], {}, "--algo must be dpo, nll or pretrain"),
        (["replay", "stage", "nope", "--run", "/no/run"], {}, "unknown stage 'nope'; choose one of: assemble, echo"),
        (["replay", "stage", "judge", "--run", "/no/run"], {}, "no manifest.json in /no/run"),
        (["export", "sip.pairs", "--run", "/no/run", "--to", "/tmp/x"], {}, "no manifest.json in /no/run"),
        (["export", "sip.pairs", "--run", "/no/run", "--to", "/tmp/x", "--format", "csv"], {},
         "--format must be jsonl or parquet, not 'csv'"),
        # The wrong folder is what a user must fix first, whether a broker runs or not (none runs here).
        (["import", "/no/such/export"], {}, "no export.json under /no/such/export"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], env: dict, message: str) -> None:
    result = sipstream(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"\x00\x01\x02\xff\xfe binary \x89PNG\r\n", "binary"),
     ("run_name: caf\u00e9\n".encode("latin-1"), "latin-1")],
    ids=["binary", "latin-1"],
)
def test_a_config_file_that_is_not_utf8_text_is_a_one_line_error(tmp_path, content: bytes, what: str) -> None:
    path = tmp_path / f"{what}.yaml"
    path.write_bytes(content)
    result = sipstream("config", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"config file {path} is not UTF-8 text" in result.stderr


def test_python_m_sipstream_learner_is_the_learner_command() -> None:
    """torchrun launches `python -m sipstream.learner`: the same options and errors as `sipstream learner`."""
    module = subprocess.run([sys.executable, "-m", "sipstream.learner", "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert module.returncode == 0, module.stderr
    assert module.stdout == sipstream("learner", "--help").stdout
    for option in ("--config", "--set", "--bootstrap-servers", "--algo", "--max-steps", "--idle-timeout"):
        assert option in module.stdout
    # `--bootstrap` (as deploy/ and older scripts write it) is accepted; the config is checked before any broker.
    failed = subprocess.run([sys.executable, "-m", "sipstream.learner", "--bootstrap", "127.0.0.1:1",
                             "--set=learner.algo=ppo"], capture_output=True, text=True, timeout=60, check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "learner.algo: Input should be 'dpo', 'nll' or 'pretrain'" in failed.stderr


def test_config_show_prints_the_resolved_config() -> None:
    result = sipstream("config", "--set", "rollout.rollouts=16", env={"SIPSTREAM_RUNNER__BATCH_SIZE": "3"})
    assert result.returncode == 0, result.stderr
    assert "rollouts: 16" in result.stdout and "batch_size: 3" in result.stdout


def test_export_checks_the_broker_first_and_leaves_no_folder(tmp_path) -> None:
    import json

    from sipstream.config import Config

    run = tmp_path / "run"
    run.mkdir()
    manifest = {"format": 1, "kind": "learner", "run_name": "gone", "config": Config().model_dump(mode="json"),
                "bus": {"bootstrap_servers": "127.0.0.1:1", "topic_prefix": ""},
                "topics": {"sip.pairs": {"live_name": "sip.pairs", "role": "consumed", "partitions": {"0": [0, 3]},
                                         "records": 3}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = sipstream("export", "sip.pairs", "--run", str(run), "--to", str(tmp_path / "archive"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no Kafka broker answered at 127.0.0.1:1" in result.stderr
    assert not (tmp_path / "archive").exists()
