"""Kafka client settings, in one place, each non-obvious key with its reason.

Delivery guarantee of the whole engine: **at-least-once**. Producers are idempotent with acks=all,
consumers never auto-commit, and the runner commits offsets only after every record it produced for
a batch is acknowledged. Duplicates after a crash are removed downstream by `item_id`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from sipstream.config import RECORD_FRAMING_BYTES, REDACTED, BusConfig, RunnerConfig, env_reference
from sipstream.errors import BrokerError, UserError


def client_settings(bus: BusConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`bus.client` as librdkafka gets it: security (security.protocol, sasl.mechanism, sasl.username,
    sasl.password, ssl.ca.location, ...) and any other setting passed through unchanged, except that a
    value written `${NAME}` is read from the environment here, at the last moment, so the secret never
    sits in a config object that may be dumped."""
    environ = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    for key, value in bus.client.items():
        name = env_reference(value)
        if name is not None:
            if name not in environ:
                raise UserError(f"bus.client.{key} refers to the environment variable {name}, which is not set")
            value = environ[name]
        elif value == REDACTED:
            raise UserError(
                f"bus.client.{key} was redacted from this config file; pass the credential through the environment "
                "(a ${NAME} reference, or SIPSTREAM_SECRETS)"
            )
        settings[key] = value
    return settings


def _base(bus: BusConfig, bootstrap: str) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        # Idle-connection closes by the broker are normal; don't print them as failures.
        "log.connection.close": False,
    }
    # Security and any other librdkafka setting the user passes (SASL/SCRAM, TLS, client.rack, ...).
    conf.update(client_settings(bus))
    return conf


def producer_config(bus: BusConfig, bootstrap: str, client_id: str = "sipstream",
                    max_record_bytes: int = RunnerConfig.model_fields["max_record_bytes"].default) -> dict[str, Any]:
    """`max_record_bytes`: the largest record (key + value) this producer writes, `runner.max_record_bytes`."""
    conf = _base(bus, bootstrap)
    conf.update(
        {
            "client.id": client_id,
            # Idempotence + acks=all: a retried send never duplicates or reorders within a partition.
            "enable.idempotence": True,
            "acks": "all",
            # Small linger batches records of one stage batch into few requests without adding latency.
            "linger.ms": 5,
            # Derived from the one record limit (config validates a user's own value against it): a record the
            # runner accepts can be produced; the limit's default stays within Kafka's default 1 MB topics.
            "message.max.bytes": max_record_bytes + RECORD_FRAMING_BYTES,
        }
    )
    conf.update(client_settings(bus))  # user settings win
    return conf


def consumer_config(
    bus: BusConfig, bootstrap: str, group_id: str, client_id: str = "sipstream", instance_id: str | None = None
) -> dict[str, Any]:
    conf = _base(bus, bootstrap)
    conf.update(
        {
            "client.id": client_id,
            "group.id": group_id,
            # We commit explicitly after the batch's output is acknowledged (at-least-once).
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A new group starts from the beginning: no item of a topic is skipped.
            "auto.offset.reset": "earliest",
            # A group join waits ~session.timeout/2 on the embedded broker (docs/embedded-broker.md); keep it short.
            "session.timeout.ms": bus.session_timeout_ms,
            "heartbeat.interval.ms": max(100, bus.session_timeout_ms // 10),
            # Model calls on a batch can take minutes on CPU; the poll interval must outlast them.
            "max.poll.interval.ms": 30 * 60 * 1000,
            # Cooperative rebalancing: adding a worker does not stop the others' partitions.
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    if instance_id:
        # Static membership: a restarted worker with the same id gets its partitions back without a rebalance.
        conf["group.instance.id"] = instance_id
    conf.update(client_settings(bus))  # user settings win
    return conf


def admin_config(bus: BusConfig, bootstrap: str) -> dict[str, Any]:
    return _base(bus, bootstrap)


def usable_messages(messages: list[Any], topic: str, log: Any) -> list[Any]:
    """The records among consumed messages; errors handled in one place, the confluent-kafka way:
    end-of-partition is skipped, a missing topic is a user error, fatal or non-retriable errors raise,
    retriable ones are logged (librdkafka retries them)."""


    records = []
    for msg in messages:
        err = msg.error()
        if err is None:
            records.append(msg)
        elif err.code() == KafkaError._PARTITION_EOF:
            continue
        elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise UserError(f"topic {topic} does not exist; run `sipstream topics create` first")
        elif err.fatal() or not err.retriable():
            raise KafkaException(err)
        else:
            log.warning("consumer error, retrying", error=err.str())
    return records


def check_reachable(bus: BusConfig, bootstrap: str, timeout: float = 10.0) -> None:
    """Raise a `BrokerError` that says what to do when no broker answers at `bootstrap`."""

    admin = AdminClient(
        admin_config(bus, bootstrap)
        # We report an unreachable broker ourselves, in one line; silence librdkafka's own retries.
        | {"socket.connection.setup.timeout.ms": int(timeout * 1000), "log_level": 0}
    )
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(
            f"no Kafka broker answered at {bootstrap} within {timeout:.0f}s ({exc.args[0].str()}); "
            "check bus.bootstrap_servers, or leave it unset to use the embedded broker"
        ) from None
