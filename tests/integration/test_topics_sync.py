"""`sync_topics` against the real embedded broker: dry run, create, idempotence, drift repair.

Each test syncs under its own fresh topic prefix, so it starts from a cluster without its topics.
The embedded Tansu broker lacks CreatePartitions; growing a topic is checked to fail *loudly and
alone* there (and to succeed on a broker that has it, should these tests run against real Kafka).
"""

from __future__ import annotations

import uuid

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from sipstream.bus import topics as T
from sipstream.bus.sync import sync_topics


def _fresh_bus(bus):
    return bus.cfg.bus.model_copy(update={"topic_prefix": f"s{uuid.uuid4().hex[:10]}."})


def _retention(bootstrap: str, topic: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([resource])[resource].result(10)["retention.ms"].value


def test_dry_run_changes_nothing_then_apply_creates_and_second_sync_is_a_no_op(bus) -> None:
    cfg = _fresh_bus(bus)
    specs = T.load_specs()

    plan = sync_topics(cfg, bus.bootstrap, specs, apply=False)
    assert {a.kind for a in plan.actions} == {"create"}
    assert {a.status for a in plan.actions} == {"planned"}
    assert len(plan.actions) == len(specs)
    assert not any(t.startswith(cfg.topic_prefix) for t in T.list_topics(cfg, bus.bootstrap))

    applied = sync_topics(cfg, bus.bootstrap, specs, apply=True)
    assert applied.ok and applied.changed, applied.lines()
    assert {a.status for a in applied.actions} == {"done"}
    live = T.list_topics(cfg, bus.bootstrap)
    for spec in specs.values():
        assert live[cfg.topic(spec.name)] == spec.partitions

    again = sync_topics(cfg, bus.bootstrap, specs, apply=True)
    assert again.actions == [], again.lines()
    assert sorted(again.in_sync) == sorted(cfg.topic(n) for n in specs)


def test_retention_drift_is_set_back_and_other_topics_are_untouched(bus) -> None:
    cfg = _fresh_bus(bus)
    specs = T.load_specs()
    assert sync_topics(cfg, bus.bootstrap, specs, apply=True).ok
    drifted = cfg.topic(T.PAIRS)
    admin = AdminClient({"bootstrap.servers": bus.bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, drifted, incremental_configs=[
        ConfigEntry("retention.ms", "12345", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(10)
    assert _retention(bus.bootstrap, drifted) == "12345"

    plan = sync_topics(cfg, bus.bootstrap, specs, apply=False)
    assert [(a.topic, a.kind) for a in plan.actions] == [(drifted, "set_config")]
    assert "retention.ms: 12345 -> -1" in plan.actions[0].detail
    assert _retention(bus.bootstrap, drifted) == "12345"  # a dry run changes nothing

    applied = sync_topics(cfg, bus.bootstrap, specs, apply=True)
    assert applied.ok and [a.status for a in applied.actions] == ["done"], applied.lines()
    assert _retention(bus.bootstrap, drifted) == str(specs[T.PAIRS].retention_ms)


def test_partitions_are_raised_never_lowered(bus) -> None:
    cfg = _fresh_bus(bus)
    specs = T.load_specs()
    assert sync_topics(cfg, bus.bootstrap, specs, apply=True).ok

    grown = dict(specs)
    grown[T.ROLLOUTS] = specs[T.ROLLOUTS].model_copy(update={"partitions": specs[T.ROLLOUTS].partitions + 4})
    grown[T.JUDGED] = specs[T.JUDGED].model_copy(update={"partitions": 1})  # fewer than live
    report = sync_topics(cfg, bus.bootstrap, grown, apply=True)
    by_topic = {a.topic: a for a in report.actions}
    assert set(by_topic) == {cfg.topic(T.ROLLOUTS), cfg.topic(T.JUDGED)}, report.lines()

    keep = by_topic[cfg.topic(T.JUDGED)]
    assert (keep.kind, keep.status) == ("keep_partitions", "refused")
    live = T.list_topics(cfg, bus.bootstrap)
    assert live[cfg.topic(T.JUDGED)] == specs[T.JUDGED].partitions

    grow = by_topic[cfg.topic(T.ROLLOUTS)]
    assert grow.kind == "add_partitions"
    if grow.status == "done":  # a broker with CreatePartitions (real Kafka)
        assert live[cfg.topic(T.ROLLOUTS)] == grown[T.ROLLOUTS].partitions
        assert report.ok
    else:  # the embedded Tansu broker: reported as a failure of this action alone
        assert grow.status == "failed" and "CreatePartitions" in (grow.error or ""), grow
        assert not report.ok
        assert live[cfg.topic(T.ROLLOUTS)] == specs[T.ROLLOUTS].partitions
