"""Prometheus metrics of one process (a stage worker or the learner), served at /metrics.

Each process owns a `CollectorRegistry` (not prometheus-client's global one), so several runners or a
runner and a learner can live in one process (tests) without their series mixing. Every series carries
`run` (config `run_name`) and `stage` (the stage name, or `learner`); record counters add `topic` (the
live topic name) and dead letters the failure class `error`. A labelled series appears once it has a
value: a learner that has not stepped yet exports no loss rather than a made-up 0.

| name | type | labels | who | meaning |
|---|---|---|---|---|
| sipstream_records_consumed_total | counter | run, stage, topic | worker, learner | records read from the input topic (dead-lettered ones included) |
| sipstream_records_produced_total | counter | run, stage, topic | worker | output records acknowledged by the broker |
| sipstream_records_deadlettered_total | counter | run, stage, topic, error | worker, learner | records sent to sip.deadletter, by failure class |
| sipstream_processing_errors_total | counter | run, stage | worker | records on which the stage raised (dead-lettered as `process`) |
| sipstream_batch_duration_seconds | histogram | run, stage | worker | consume → process → produce → acknowledge → commit of one batch |
| sipstream_stage_events_total | counter | run, stage, event | worker | the stage's own counters (rollouts sampled, weights loaded/refused, chosen candidates by kind) |
| sipstream_policy_version | gauge | run, stage | rollout worker, learner | the policy version serving rollouts / last published |
| sipstream_model_load_seconds | gauge | run, stage | worker, learner | how long the last model or weights load took |
| sipstream_learner_steps_total | counter | run, stage | learner | optimizer steps |
| sipstream_learner_pairs_trained_total | counter | run, stage | learner | pairs that entered a step |
| sipstream_learner_tokens_total | counter | run, stage | learner | tokens trained on (prompt and continuations) |
| sipstream_learner_loss | gauge | run, stage | learner | loss of the last step |
| sipstream_learner_reward_margin | gauge | run, stage | learner (dpo) | mean implicit reward margin chosen − rejected of the last step |
| sipstream_learner_tokens_per_second | gauge | run, stage | learner | tokens trained per second over the last `runner.metrics_interval_s` (idle time included) |
| sipstream_weights_published_total | counter | run, stage | learner | weight versions published to the store and announced |
| sipstream_weights_publish_duration_seconds | histogram | run, stage | learner | store write + announcement acknowledged |

Consumer lag is not exported by workers: it needs the topic's end offsets, which the embedded broker
reports wrongly (see `sipstream.bus.tail`). `sipstream status` measures it exactly; on a real Kafka
cluster the usual kafka_exporter / Strimzi Kafka Exporter exports group lag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Process = Literal["worker", "learner"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """The exposition name (counters end in `_total`, durations in `_seconds`)."""
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...]
    """Beyond `run` and `stage`, which every series has."""
    processes: tuple[Process, ...]
    help: str


BASE_LABELS = ("run", "stage")
W, L, WL = ("worker",), ("learner",), ("worker", "learner")

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("sipstream_records_consumed_total", "counter", ("topic",), WL,
               "Records read from the input topic (dead-lettered ones included)."),
    MetricSpec("sipstream_records_produced_total", "counter", ("topic",), W, "Output records acknowledged by the broker."),
    MetricSpec("sipstream_records_deadlettered_total", "counter", ("topic", "error"), WL,
               "Records sent to sip.deadletter, by failure class."),
    MetricSpec("sipstream_processing_errors_total", "counter", (), W, "Records on which the stage raised."),
    MetricSpec("sipstream_batch_duration_seconds", "histogram", (), W,
               "One batch from consume to commit (process, produce, acknowledgements included)."),
    MetricSpec("sipstream_stage_events_total", "counter", ("event",), W, "The stage's own counters."),
    MetricSpec("sipstream_policy_version", "gauge", (), WL, "Policy version serving rollouts / last published."),
    MetricSpec("sipstream_model_load_seconds", "gauge", (), WL, "How long the last model or weights load took."),
    MetricSpec("sipstream_learner_steps_total", "counter", (), L, "Optimizer steps."),
    MetricSpec("sipstream_learner_pairs_trained_total", "counter", (), L, "Pairs that entered an optimizer step."),
    MetricSpec("sipstream_learner_tokens_total", "counter", (), L, "Tokens trained on."),
    MetricSpec("sipstream_learner_loss", "gauge", (), L, "Loss of the last optimizer step."),
    MetricSpec("sipstream_learner_reward_margin", "gauge", (), L, "DPO: mean implicit reward margin of the last step."),
    MetricSpec("sipstream_learner_tokens_per_second", "gauge", (), L,
               "Tokens trained per second over the last metrics interval (idle time included)."),
    MetricSpec("sipstream_weights_published_total", "counter", (), L, "Weight versions published and announced."),
    MetricSpec("sipstream_weights_publish_duration_seconds", "histogram", (), L,
               "Weight store write plus acknowledged announcement."),
)

# Batches last milliseconds (plumbing) to minutes (big models on CPU); publishes seconds to minutes.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def documented_names(process: Process) -> set[str]:
    """The exposition names a process of this kind serves (what the table of docs/observability.md lists)."""
    return {s.name for s in SPECS if process in s.processes}


class ProcessMetrics:
    """One process's metrics in its own registry; calls name a metric from `SPECS` (a typo raises)."""

    def __init__(self, process: Process, run: str, stage: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # *_created series would double every counter for little use
        self.registry = CollectorRegistry()
        self._base = {"run": run, "stage": stage}
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, str], float] = {}
        for spec in SPECS:
            if process not in spec.processes:
                continue
            labels = (*BASE_LABELS, *spec.labels)
            if spec.kind == "counter":
                self._metrics[spec.name] = Counter(spec.name, spec.help, labels, registry=self.registry)
            elif spec.kind == "gauge":
                self._metrics[spec.name] = Gauge(spec.name, spec.help, labels, registry=self.registry)
            else:
                self._metrics[spec.name] = Histogram(spec.name, spec.help, labels, registry=self.registry,
                                                     buckets=_BUCKETS)

    def _child(self, name: str, labels: Mapping[str, Any]) -> Any:
        return self._metrics[name].labels(**self._base, **{k: str(v) for k, v in labels.items()})

    def inc(self, name: str, amount: float = 1.0, **labels: Any) -> None:
        if amount > 0:
            self._child(name, labels).inc(amount)

    def set(self, name: str, value: float | None, **labels: Any) -> None:
        if value is not None:
            self._child(name, labels).set(float(value))

    def observe(self, name: str, seconds: float, **labels: Any) -> None:
        self._child(name, labels).observe(seconds)

    def sync_total(self, name: str, total: float, **labels: Any) -> None:
        """Raise a counter to `total` (a running count kept elsewhere, e.g. a stage's own counters).
        A total that went down (a counter reset by its owner) restarts the tracking without decrementing."""
        key = (name, repr(sorted(labels.items())))
        last = self._last.get(key, 0.0)
        self.inc(name, total - last if total >= last else total, **labels)
        self._last[key] = total

    def text(self) -> bytes:
        """The Prometheus exposition text (what /metrics serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
