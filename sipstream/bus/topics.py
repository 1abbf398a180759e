"""Topic contracts: one spec per topic in `topics/` (name, partitions, retention, key, JSON Schema).

The CLI creates topics from the specs on any Kafka-protocol cluster (idempotently) and reports where
a live topic differs from its spec. Producers and consumers validate values against the schema.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fastjsonschema
import yaml
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field

from sipstream.bus.client import admin_config
from sipstream.config import BusConfig, project_root
from sipstream.errors import ConfigError, UserError

# The topics every sipstream deployment needs (docs/design.md, "Topics"), in pipeline order.
DOCUMENTS = "sip.documents"
PREFIXES = "sip.prefixes"
REWRITTEN = "sip.rewritten"
ROLLOUTS = "sip.rollouts"
JUDGED = "sip.judged"
PAIRS = "sip.pairs"
WEIGHTS = "sip.weights"
METRICS = "sip.metrics"
DEADLETTER = "sip.deadletter"
ECHO = "sip.echo"
CORE_TOPICS = (DOCUMENTS, PREFIXES, REWRITTEN, ROLLOUTS, JUDGED, PAIRS, WEIGHTS, METRICS, DEADLETTER)


class TopicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    partitions: int = Field(ge=1)
    replication_factor: int = Field(-1, ge=-1)
    """-1: the cluster's default (1 on the embedded broker, usually 3 on a real cluster)."""
    retention_ms: int = Field(ge=-1)
    key: str
    configs: dict[str, str] = Field(default_factory=dict)
    schema_: dict[str, Any] = Field(alias="schema")

    def topic_configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), **self.configs}

    @cached_property
    def validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.schema_, format_checker=FormatChecker())

    @cached_property
    def compiled(self) -> Callable[[Any], Any]:
        """The schema compiled to Python (fastjsonschema): ~10-100x faster than walking it per record."""
        return fastjsonschema.compile(self.schema_)

    def errors(self, value: Any) -> list[str]:
        """Schema violations of `value`, as `path: message` lines (empty when valid).

        Every record on the bus passes here twice (in and out), so the compiled validator decides; only
        a record it rejects is walked again by jsonschema, whose messages name every violation. A unit
        test checks both agree on valid and mutated records of every topic."""
        try:
            self.compiled(value)
            return []
        except fastjsonschema.JsonSchemaValueException as rejected:
            out = []
            for err in sorted(self.validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
                where = "/".join(str(p) for p in err.absolute_path) or "(root)"
                out.append(f"{where}: {err.message[:300]}")
            return out or [f"(root): {rejected.message[:300]}"]


def topics_dir(bus: BusConfig | None = None) -> Path:
    if bus is not None and bus.topics_dir is not None:
        return bus.topics_dir
    packaged = Path(__file__).resolve().parent.parent / "_topics"
    return packaged if packaged.is_dir() else project_root() / "topics"


def load_specs(directory: Path | None = None) -> dict[str, TopicSpec]:
    """Read and check every `*.yaml` spec; the file name must match the topic name."""
    directory = directory or topics_dir()
    if not directory.is_dir():
        raise ConfigError(f"topic specs directory not found: {directory} (set bus.topics_dir)")
    specs: dict[str, TopicSpec] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            spec = TopicSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
            Draft202012Validator.check_schema(spec.schema_)
        except (ValueError, yaml.YAMLError, SchemaError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"bad topic spec {path}: {first}") from None
        if path.stem != spec.name:
            raise ConfigError(f"topic spec {path} names topic {spec.name!r}; rename the file to {spec.name}.yaml")
        specs[spec.name] = spec
    missing = [t for t in CORE_TOPICS if t not in specs]
    if missing:
        raise ConfigError(f"topic specs missing in {directory}: {', '.join(missing)}")
    return specs


# --------------------------------------------------------------------------- cluster operations


@dataclass
class TopicState:
    """A spec compared with the live topic."""

    name: str
    exists: bool
    partitions: int | None = None
    configs: dict[str, str] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exists and not self.differences


def _admin(bus: BusConfig, bootstrap: str):


    return AdminClient(admin_config(bus, bootstrap))


def create_topics(
    bus: BusConfig, bootstrap: str, specs: dict[str, TopicSpec], timeout: float = 30.0
) -> dict[str, str]:
    """Create missing topics; return {name: 'created' | 'exists'}. Safe to run twice."""

    admin = _admin(bus, bootstrap)
    live = set(admin.list_topics(timeout=timeout).topics)
    result = {bus.topic(name): "exists" for name in specs if bus.topic(name) in live}
    todo = [
        NewTopic(bus.topic(s.name), num_partitions=s.partitions, replication_factor=s.replication_factor, config=s.topic_configs())
        for s in specs.values()
        if bus.topic(s.name) not in live
    ]
    if not todo:
        return result
    for name, future in admin.create_topics(todo, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            result[name] = "created"
        except Exception as exc:  # KafkaException wraps a KafkaError
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                result[name] = "exists"  # a concurrent creator won the race
                continue
            raise UserError(f"could not create topic {name}: {exc}") from None
    return result


def describe_topics(bus: BusConfig, bootstrap: str, specs: dict[str, TopicSpec], timeout: float = 30.0) -> list[TopicState]:
    """Compare each spec with the live topic: existence, partitions, and the configs the spec sets."""

    admin = _admin(bus, bootstrap)
    metadata = admin.list_topics(timeout=timeout).topics
    states: list[TopicState] = []
    for spec in specs.values():
        live_name = bus.topic(spec.name)
        meta = metadata.get(live_name)
        if meta is None:
            states.append(TopicState(live_name, exists=False, differences=["missing (run `sipstream topics create`)"]))
            continue
        state = TopicState(live_name, exists=True, partitions=len(meta.partitions))
        if state.partitions != spec.partitions:
            state.differences.append(f"partitions: live {state.partitions}, spec {spec.partitions}")
        # Not every broker answers DescribeConfigs fully; a config it does not report is not a difference.
        try:
            resource = ConfigResource(ResourceType.TOPIC, live_name)
            entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout=timeout)
            state.configs = {k: v.value for k, v in entries.items() if v.value is not None}
        except Exception:
            state.configs = {}
        for key, want in spec.topic_configs().items():
            have = state.configs.get(key)
            if have is not None and str(have) != str(want):
                state.differences.append(f"{key}: live {have}, spec {want}")
        states.append(state)
    return states


def list_topics(bus: BusConfig, bootstrap: str, timeout: float = 30.0) -> dict[str, int]:
    """{topic: partition count} for every live topic, internal ones excluded."""
    metadata = _admin(bus, bootstrap).list_topics(timeout=timeout).topics
    return {name: len(t.partitions) for name, t in sorted(metadata.items()) if not name.startswith("__")}


def encode_value(value: Any) -> bytes:
    """Topic values are compact UTF-8 JSON."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
