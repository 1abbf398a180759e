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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaError
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
    except Exception:
        return None
    return {k: str(v.value) for k, v in entries.items() if v.value is not None}


@dataclass
class _Plan:
    """The admin requests a sync would make, each paired with the action it reports on."""

    create: list[tuple[NewTopic, SyncAction]] = field(default_factory=list)
    grow: list[tuple[NewPartitions, SyncAction]] = field(default_factory=list)
    alter: list[tuple[ConfigResource, SyncAction]] = field(default_factory=list)


def sync_topics(
    bus: BusConfig, bootstrap: str, specs: dict[str, TopicSpec], apply: bool, timeout: float = 30.0
) -> SyncReport:
    """Compare every spec with the cluster and, with `apply`, create/grow/reconfigure to match."""

    admin = _admin(bus, bootstrap)
    metadata = admin.list_topics(timeout=timeout).topics
    report = SyncReport(apply=apply)
    plan = _Plan()
    for spec in specs.values():
        live_name = bus.topic(spec.name)
        meta = metadata.get(live_name)
        before = len(report.actions)
        if meta is None:
            _plan_create(spec, live_name, report, plan)
        else:
            _plan_partitions(spec, live_name, meta, report, plan)
            _check_replication(spec, live_name, meta, report)
            _plan_configs(spec, live_name, _live_configs(admin, live_name, timeout), report, plan)
            if len(report.actions) == before:
                report.in_sync.append(live_name)
    if apply:
        _submit(admin.create_topics, plan.create, timeout)
        _submit(admin.create_partitions, plan.grow, timeout)
        _submit(admin.incremental_alter_configs, plan.alter, timeout)
        for action in report.actions:
            if action.status == "planned":  # submitted, but the broker never answered for it
                action.status, action.error = "failed", "no answer from the broker"
    return report


# --------------------------------------------------------------------------- planning, one spec at a time


def _plan_create(spec: TopicSpec, live_name: str, report: SyncReport, plan: _Plan) -> None:
    configs = spec.topic_configs()
    action = SyncAction(
        live_name, "create",
        f"partitions={spec.partitions} replication={spec.replication_factor} "
        + " ".join(f"{k}={v}" for k, v in configs.items()),
        "planned",
    )
    report.actions.append(action)
    plan.create.append((NewTopic(live_name, num_partitions=spec.partitions,
                                 replication_factor=spec.replication_factor, config=configs), action))


def _plan_partitions(spec: TopicSpec, live_name: str, meta: Any, report: SyncReport, plan: _Plan) -> None:
    """More partitions when the spec asks for more; fewer is refused (Kafka cannot remove partitions)."""
    live_partitions = len(meta.partitions)
    if live_partitions < spec.partitions:
        action = SyncAction(
            live_name, "add_partitions",
            f"{live_partitions} -> {spec.partitions} (new records of a key may land in another partition)",
            "planned",
        )
        report.actions.append(action)
        plan.grow.append((NewPartitions(live_name, spec.partitions), action))
    elif live_partitions > spec.partitions:
        report.actions.append(SyncAction(
            live_name, "keep_partitions",
            f"live {live_partitions} > spec {spec.partitions}: partitions are never removed; raise the spec to match",
            "refused",
        ))


def _check_replication(spec: TopicSpec, live_name: str, meta: Any, report: SyncReport) -> None:
    """A different replication factor is reported only: changing it is a reassignment, an operator's call."""
    if spec.replication_factor == -1 or not meta.partitions:
        return
    live_rf = min(len(p.replicas) for p in meta.partitions.values())
    if live_rf != spec.replication_factor:
        report.actions.append(SyncAction(
            live_name, "replication",
            f"live {live_rf}, spec {spec.replication_factor}: needs a partition reassignment, not done by sync",
            "refused",
        ))


def _plan_configs(spec: TopicSpec, live_name: str, live: dict[str, str] | None, report: SyncReport,
                  plan: _Plan) -> None:
    """Set the configs the spec names that differ from the live ones (None: the broker would not say)."""
    if live is None:
        return
    changes = {k: v for k, v in spec.topic_configs().items() if live.get(k) != str(v)}
    if not changes:
        return
    action = SyncAction(
        live_name, "set_config",
        " ".join(f"{k}: {live.get(k, '(unset)')} -> {v}" for k, v in changes.items()),
        "planned",
    )
    report.actions.append(action)
    entries = [ConfigEntry(k, str(v), incremental_operation=AlterConfigOpType.SET) for k, v in changes.items()]
    plan.alter.append((ConfigResource(ResourceType.TOPIC, live_name, incremental_configs=entries), action))


# --------------------------------------------------------------------------- applying


def _submit(call: Callable[..., dict[Any, Any]], items: list[tuple[Any, SyncAction]], timeout: float) -> None:
    """One admin request for all `items`; each action gets the status of its own future."""
    if not items:
        return
    try:
        futures = call([obj for obj, _ in items], request_timeout=timeout)
    except Exception as exc:
        for _, action in items:
            action.status, action.error = "failed", _error_text(exc)
        return
    # Futures are keyed by the resource for config changes, by the topic name otherwise.
    by_key = {obj if isinstance(obj, ConfigResource) else getattr(obj, "topic", None): action for obj, action in items}
    for key, future in futures.items():
        _settle(future, by_key[key], timeout)


def _settle(future: Any, action: SyncAction, timeout: float) -> None:
    try:
        future.result(timeout=timeout)
        action.status = "done"
    except Exception as exc:
        err = exc.args[0] if exc.args else None
        if action.kind == "create" and isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            action.status = "done"  # a concurrent creator won the race
            return
        action.status, action.error = "failed", _error_text(exc)
