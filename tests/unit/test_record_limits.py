"""The one record limit, runner.max_record_bytes: the producer takes it, and config refuses values that disagree."""

from __future__ import annotations

import pytest

from sipstream.bus.client import producer_config
from sipstream.config import RECORD_FRAMING_BYTES, load_config, merged
from sipstream.errors import ConfigError


def test_the_producer_takes_the_record_limit() -> None:
    cfg = load_config(overrides=["runner.max_record_bytes=8000000"], env={})
    conf = producer_config(cfg.bus, "localhost:9092", max_record_bytes=cfg.runner.max_record_bytes)
    assert conf["message.max.bytes"] == 8_000_000 + RECORD_FRAMING_BYTES
    # The default limit stays within Kafka's default max.message.bytes (1048588).
    default = producer_config(cfg.bus, "localhost:9092")["message.max.bytes"]
    assert load_config(env={}).runner.max_record_bytes + RECORD_FRAMING_BYTES == default <= 1_048_588


def test_a_producer_limit_under_the_record_limit_is_a_config_error() -> None:
    base = load_config(env={})
    with pytest.raises(ConfigError, match=r"runner.max_record_bytes \(1000000\) must stay 1024 bytes .* message.max.bytes"):
        merged(base, bus={"client": {"message.max.bytes": 1_000_000}})
    cfg = merged(base, bus={"client": {"message.max.bytes": "2000000"}}, runner={"max_record_bytes": 1_998_976})
    assert producer_config(cfg.bus, "localhost:9092")["message.max.bytes"] == "2000000"  # the user's value wins


def test_dead_letters_must_fit_a_record() -> None:
    with pytest.raises(ConfigError, match="deadletter_max_value_bytes"):
        load_config(overrides=["runner.max_record_bytes=100000", "runner.deadletter_max_value_bytes=90000"], env={})
    load_config(overrides=["runner.max_record_bytes=4096", "runner.deadletter_max_value_bytes=1024"], env={})
