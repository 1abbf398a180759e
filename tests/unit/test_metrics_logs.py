"""sipstream.telemetry.logs: JSON events when stderr is not a terminal, without progress bars in between."""

from __future__ import annotations

import json
import os

import pytest
import structlog

from sipstream.config import LoggingConfig
from sipstream.telemetry.logs import configure_logging, get_logger


@pytest.fixture
def restore_structlog():
    yield
    structlog.reset_defaults()


def test_json_events_carry_their_fields_and_progress_bars_go_quiet(monkeypatch, capsys, restore_structlog) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    configure_logging(LoggingConfig(format="auto", level="debug"))  # stderr is captured: not a terminal
    get_logger(stage="rollout").debug("record processed", item_id="d1:2", policy_version=3, topic="sip.rewritten",
                                      partition=0, offset=7)
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert {k: event[k] for k in ("event", "stage", "item_id", "policy_version", "offset", "level")} == {
        "event": "record processed", "stage": "rollout", "item_id": "d1:2", "policy_version": 3, "offset": 7,
        "level": "debug"}
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_info_level_drops_debug_events(capsys, restore_structlog) -> None:
    configure_logging(LoggingConfig(format="json", level="info"))
    get_logger(stage="split").debug("record processed", item_id="x")
    get_logger(stage="split").info("stage started")
    assert [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()] == ["stage started"]
