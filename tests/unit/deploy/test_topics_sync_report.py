"""sync_topics' decisions with a fake admin client: the broker features the embedded broker lacks
(CreatePartitions) and the replication check, which one embedded node cannot show."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from sipstream.bus import sync as S
from sipstream.bus.topics import TopicSpec
from sipstream.config import BusConfig


def _done(value: object = None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class FakeAdmin:
    def __init__(self, topics: dict[str, tuple[int, int]], configs: dict[str, dict[str, str]]) -> None:
        self.topics = topics  # name -> (partitions, replicas)
        self.configs = configs
        self.calls: list[tuple[str, list]] = []

    def list_topics(self, timeout: float) -> SimpleNamespace:
        return SimpleNamespace(topics={
            name: SimpleNamespace(partitions={p: SimpleNamespace(replicas=list(range(rf))) for p in range(n)})
            for name, (n, rf) in self.topics.items()
        })

    def describe_configs(self, resources: list, request_timeout: float) -> dict:
        r = resources[0]
        entries = {k: SimpleNamespace(value=v) for k, v in self.configs[r.name].items()}
        return {r: _done(entries)}

    def create_topics(self, new: list, request_timeout: float) -> dict:
        self.calls.append(("create_topics", new))
        return {t.topic: _done() for t in new}

    def create_partitions(self, new: list, request_timeout: float) -> dict:
        self.calls.append(("create_partitions", new))
        return {p.topic: _done() for p in new}

    def incremental_alter_configs(self, resources: list, request_timeout: float) -> dict:
        self.calls.append(("incremental_alter_configs", resources))
        return {r: _done() for r in resources}


def _spec(name: str, partitions: int, retention: int = -1, rf: int = -1) -> TopicSpec:
    return TopicSpec.model_validate({"name": name, "partitions": partitions, "retention_ms": retention, "key": "doc_id",
                                     "replication_factor": rf, "schema": {"type": "object"}})


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    fake = FakeAdmin(
        topics={"p.a": (4, 3), "p.b": (2, 3), "p.c": (8, 1)},
        configs={"p.a": {"retention.ms": "-1"}, "p.b": {"retention.ms": "1000"}, "p.c": {"retention.ms": "-1"}},
    )
    monkeypatch.setattr(S, "_admin", lambda bus, bootstrap: fake)
    return fake


def test_grows_partitions_sets_configs_refuses_shrink_and_replication(admin: FakeAdmin) -> None:
    specs = {"a": _spec("a", 4), "b": _spec("b", 6), "c": _spec("c", 4, rf=3), "d": _spec("d", 2)}
    report = S.sync_topics(BusConfig(topic_prefix="p."), "x:9092", specs, apply=True)
    kinds = {(a.topic, a.kind): a.status for a in report.actions}
    assert kinds == {
        ("p.b", "add_partitions"): "done",
        ("p.b", "set_config"): "done",
        ("p.c", "keep_partitions"): "refused",
        ("p.c", "replication"): "refused",
        ("p.d", "create"): "done",
    }
    assert report.in_sync == ["p.a"]
    assert report.ok and report.changed
    calls = dict(admin.calls)
    assert [(p.topic, p.new_total_count) for p in calls["create_partitions"]] == [("p.b", 6)]
    assert [t.topic for t in calls["create_topics"]] == ["p.d"]
    assert "retention.ms: 1000 -> -1" in next(a.detail for a in report.actions if a.kind == "set_config")


def test_dry_run_calls_nothing_that_changes_the_cluster(admin: FakeAdmin) -> None:
    report = S.sync_topics(BusConfig(topic_prefix="p."), "x:9092", {"b": _spec("b", 6), "d": _spec("d", 2)}, apply=False)
    assert admin.calls == []
    assert {a.status for a in report.actions} == {"planned"}
    assert all(line.startswith("p.") for line in report.lines())


def test_an_api_the_broker_lacks_fails_only_its_actions(admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(new: list, request_timeout: float) -> dict:
        raise RuntimeError("CreatePartitions (KIP-195) not supported by broker")

    monkeypatch.setattr(admin, "create_partitions", unsupported)
    report = S.sync_topics(BusConfig(topic_prefix="p."), "x:9092", {"b": _spec("b", 6), "d": _spec("d", 2)}, apply=True)
    status = {(a.topic, a.kind): (a.status, a.error) for a in report.actions}
    assert status[("p.b", "add_partitions")][0] == "failed"
    assert "CreatePartitions" in status[("p.b", "add_partitions")][1]
    assert status[("p.d", "create")] == ("done", None)
    assert status[("p.b", "set_config")] == ("done", None)
    assert not report.ok
