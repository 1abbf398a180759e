"""`sipstream topics sync`: make a cluster's topics match `topics/`, safely.

What it changes, per spec (live name = `bus.topic_prefix` + spec name):
- a missing topic is **created** with the spec's partitions, replication factor and configs;
- a topic with fewer partitions than the spec gets **more partitions** (CreatePartitions). Never fewer:
  Kafka cannot remove partitions, and the spec's count is a floor for consumer parallelism. A live
  count above the spec is reported and left alone. Adding partitions moves where new records of a key
  land (keys are `doc_id`), so a document already in flight may have items in two partitions; the
  pipeline tolerates that (items are independent, dedupe is by `item_id`), but the report says so;
- a config the spec sets (`retention.ms` and `configs:`) that differs from the live value is **set**
  with IncrementalAlterConfigs (only the keys the spec names; other topic configs are not touched);
- a replication factor different from the spec is reported only: changing it is a partition
  reassignment, an operator's decision (`kafka-reassign-partitions.sh`, or Strimzi's `replicas`).

`apply=False` is a dry run: the report lists what would be done and nothing is changed. Every action
carries a status, so a failure on one topic (e.g. a broker without CreatePartitions, as the embedded
Tansu broker) is reported without hiding the others. The caller decides the exit code from
`SyncReport.ok`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from confluent_kafka.admin import (
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from sipstream.bus.topics import TopicSpec, _admin
from sipstream.config import BusConfig

ActionKind = Literal["create", "add_partitions", "set_config", "keep_partitions", "replication"]
Status = Literal["planned", "done", "failed", "refused"]


@dataclass
class SyncAction:
    """One difference between a spec and the cluster, and what was done about it."""

    topic: str
    kind: ActionKind
    detail: str
    status: Status
    error: str | None = None

    def line(self) -> str:
        tail = f" ({self.error})" if self.error else ""
        return f"{self.topic:24s} {self.kind:16s} {self.status:9s} {self.detail}{tail}"


@dataclass
class SyncReport:
    apply: bool
    actions: list[SyncAction] = field(default_factory=list)
    in_sync: list[str] = field(default_factory=list)
    """Live names of topics that already matched their spec."""

    @property
    def ok(self) -> bool:
        """No action failed. Refusals (fewer partitions, replication) are warnings, not failures."""
        return not any(a.status == "failed" for a in self.actions)

    @property
    def changed(self) -> bool:
        return any(a.status == "done" for a in self.actions)

    def lines(self) -> list[str]:
        out = [a.line() for a in self.actions]
        out += [f"{name:24s} in sync" for name in self.in_sync]
        return out


def _error_text(exc: BaseException) -> str:
    err = exc.args[0] if exc.args else None
    text = err.str() if hasattr(err, "str") else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _live_configs(admin, live_name: str, timeout: float) -> dict[str, str] | None:
    """The topic's configs, or None when the broker would not say (then configs are not compared)."""

    resource = ConfigResource(ResourceType.TOPIC, live_name)
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout=timeout)
    except Exception:  # noqa: BLE001 - a broker that cannot describe configs: compare nothing
        return None
    return {k: str(v.value) for k, v in entries.items() if v.value is not None}


def sync_topics(
    bus: BusConfig, bootstrap: str, specs: dict[str, TopicSpec], apply: bool, timeout: float = 30.0
) -> SyncReport:
    """Compare every spec with the cluster and, with `apply`, create/grow/reconfigure to match."""

    admin = _admin(bus, bootstrap)
    metadata = admin.list_topics(timeout=timeout).topics
    report = SyncReport(apply=apply)
    to_create: list[tuple[NewTopic, SyncAction]] = []
    to_grow: list[tuple[NewPartitions, SyncAction]] = []
    to_alter: list[tuple[ConfigResource, SyncAction]] = []

    for spec in specs.values():
        live_name = bus.topic(spec.name)
        meta = metadata.get(live_name)
        if meta is None:
            action = SyncAction(
                live_name, "create",
                f"partitions={spec.partitions} replication={spec.replication_factor} "
                + " ".join(f"{k}={v}" for k, v in spec.topic_configs().items()),
                "planned",
            )
            report.actions.append(action)
            to_create.append((NewTopic(live_name, num_partitions=spec.partitions,
                                       replication_factor=spec.replication_factor, config=spec.topic_configs()), action))
            continue

        before = len(report.actions)
        live_partitions = len(meta.partitions)
        if live_partitions < spec.partitions:
            action = SyncAction(
                live_name, "add_partitions",
                f"{live_partitions} -> {spec.partitions} (new records of a key may land in another partition)",
                "planned",
            )
            report.actions.append(action)
            to_grow.append((NewPartitions(live_name, spec.partitions), action))
        elif live_partitions > spec.partitions:
            report.actions.append(SyncAction(
                live_name, "keep_partitions",
                f"live {live_partitions} > spec {spec.partitions}: partitions are never removed; raise the spec to match",
                "refused",
            ))

        if spec.replication_factor != -1 and meta.partitions:
            live_rf = min(len(p.replicas) for p in meta.partitions.values())
            if live_rf != spec.replication_factor:
                report.actions.append(SyncAction(
                    live_name, "replication",
                    f"live {live_rf}, spec {spec.replication_factor}: needs a partition reassignment, not done by sync",
                    "refused",
                ))

        live = _live_configs(admin, live_name, timeout)
        if live is not None:
            changes = {k: v for k, v in spec.topic_configs().items() if live.get(k) != str(v)}
            if changes:
                action = SyncAction(
                    live_name, "set_config",
                    " ".join(f"{k}: {live.get(k, '(unset)')} -> {v}" for k, v in changes.items()),
                    "planned",
                )
                report.actions.append(action)
                entries = [ConfigEntry(k, str(v), incremental_operation=AlterConfigOpType.SET) for k, v in changes.items()]
                to_alter.append((ConfigResource(ResourceType.TOPIC, live_name, incremental_configs=entries), action))

        if len(report.actions) == before:
            report.in_sync.append(live_name)

    if not apply:
        return report

    def settle(futures: dict, actions: dict) -> None:
        for key, future in futures.items():
            action = actions[key]
            try:
                future.result(timeout=timeout)
                action.status = "done"
            except Exception as exc:  # noqa: BLE001 - recorded on the action; the caller reports it
                from confluent_kafka import KafkaError

                err = exc.args[0] if exc.args else None
                if action.kind == "create" and isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    action.status = "done"  # a concurrent creator won the race
                    continue
                action.status, action.error = "failed", _error_text(exc)

    def submit(call, items: list) -> None:
        if not items:
            return
        try:
            futures = call([obj for obj, _ in items], request_timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - e.g. the broker lacks the API: fail these actions only
            for _, action in items:
                action.status, action.error = "failed", _error_text(exc)
            return
        by_key = {}
        for obj, action in items:
            by_key[obj if isinstance(obj, ConfigResource) else getattr(obj, "topic", None)] = action
        settle(futures, by_key)

    submit(admin.create_topics, to_create)
    submit(admin.create_partitions, to_grow)
    submit(admin.incremental_alter_configs, to_alter)
    for action in report.actions:
        if action.status == "planned":  # submitted, but the broker never answered for it
            action.status, action.error = "failed", "no answer from the broker"
    return report
