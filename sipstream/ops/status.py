"""`sipstream status`: a running system seen from the bus alone (no access to the workers needed).

    per topic        records (sum of end offsets) and records/s (end offsets over time)
    per stage        consumer lag: the group's committed offsets against its input topic's end
    dead letters     how many, by stage and class, and the latest reasons (sip.deadletter)
    rollout workers  the policy version each one serves and its age (sip.metrics + sip.weights)
    learner          step, policy version, loss, reward margin, tokens/s (its sip.metrics records)

End offsets are read by consuming every topic to its end (`TopicTail`), because the embedded broker's
`get_watermark_offsets` is wrong: the first snapshot reads each topic's history once, later ones only
what is new. Rates need two readings, so `--once`/`--json` read twice, `interval_s` apart.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import KafkaException

from sipstream.bus import topics as T
from sipstream.bus.client import admin_config, client_settings
from sipstream.bus.lag import PIPELINE_STAGES, STAGE_INPUTS, CommittedOffsets, group_lag
from sipstream.bus.tail import TopicTail
from sipstream.config import Config
from sipstream.errors import UserError

# Topics shown, in pipeline order; control topics after the data.
STATUS_TOPICS = (T.DOCUMENTS, T.PREFIXES, T.REWRITTEN, T.ROLLOUTS, T.JUDGED, T.PAIRS, T.WEIGHTS, T.METRICS,
                 T.DEADLETTER, T.ECHO)
LATEST_DEADLETTERS = 5
RATE_WINDOW_S = 10.0
"""Rates are averaged over about this long (at least two readings), so a live view does not flicker."""


@dataclass
class TopicStatus:
    topic: str
    records: int
    """Sum of the partitions' end offsets."""
    records_per_s: float | None
    """None until two readings exist."""


@dataclass
class StageLag:
    stage: str
    group: str
    topic: str
    end: int
    committed: int | None
    """Sum of committed offsets; None when the group never committed."""
    lag: int


@dataclass
class WorkerStatus:
    source: str
    instance: str
    last_seen_s: float
    """Seconds since its last sip.metrics record (a stale worker stands out)."""
    consumed: float | None = None
    deadlettered: float | None = None
    policy_version: int | None = None
    policy_age_s: float | None = None
    """Seconds since that version was announced; None for the initial policy (version 0)."""


@dataclass
class LearnerStatus:
    instance: str
    last_seen_s: float
    step: float | None = None
    policy_version: int | None = None
    loss: float | None = None
    reward_margin: float | None = None
    tokens_per_s: float | None = None


@dataclass
class Snapshot:
    ts: float
    bootstrap: str
    topics: list[TopicStatus] = field(default_factory=list)
    lag: list[StageLag] = field(default_factory=list)
    deadletters: int = 0
    deadletters_by: dict[str, int] = field(default_factory=dict)
    """`stage/error` → count."""
    latest_deadletters: list[dict[str, Any]] = field(default_factory=list)
    latest_policy_version: int | None = None
    workers: list[WorkerStatus] = field(default_factory=list)
    learner: list[LearnerStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- pure helpers


def rate(history: deque[tuple[float, int]]) -> float | None:
    """Records/s between the oldest and newest (time, end offsets) readings kept."""
    if len(history) < 2 or history[-1][0] <= history[0][0]:
        return None
    return (history[-1][1] - history[0][1]) / (history[-1][0] - history[0][0])


def parse_ts(value: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except (ValueError, AttributeError):
        return None


def worker_status(record: dict[str, Any], now: float, announced: dict[int, float]) -> WorkerStatus:
    """A stage worker's row from its latest sip.metrics record (`StageRunner.metrics_record`)."""
    counters = record.get("counters") or {}
    version = counters.get("stage.policy_version")
    version = None if version is None else int(version)
    age = None if version in (None, 0) or version not in announced else max(now - announced[version], 0.0)
    return WorkerStatus(record["source"], record.get("instance", ""), max(now - record["ts"], 0.0),
                        counters.get("consumed"), counters.get("deadlettered"), version, age)


def learner_status(record: dict[str, Any], now: float) -> LearnerStatus:
    gauges = record.get("gauges") or {}
    version = gauges.get("policy_version")
    return LearnerStatus(record.get("instance", ""), max(now - record["ts"], 0.0), gauges.get("step"),
                         None if version is None else int(version), gauges.get("loss"), gauges.get("reward_margin"),
                         gauges.get("tokens_per_s"))


# --------------------------------------------------------------------------- reading the bus


class StatusWatcher:
    """Follows the topics of one run (its `bus.topic_prefix`) and builds snapshots."""

    def __init__(self, cfg: Config, bootstrap: str) -> None:

        self.cfg = cfg
        self.bootstrap = bootstrap
        specs = T.load_specs(T.topics_dir(cfg.bus))
        live = T.list_topics(cfg.bus, bootstrap, timeout=10)
        self.topics = [t for t in STATUS_TOPICS if t in specs and cfg.bus.topic(t) in live]
        self._history: dict[str, deque[tuple[float, int]]] = {t: deque() for t in self.topics}
        self._metrics: dict[tuple[str, str], dict[str, Any]] = {}
        self._announced: dict[int, float] = {}  # this run's policy versions → announcement time
        self._deadletters: Counter[str] = Counter()
        self._latest_deadletters: deque[dict[str, Any]] = deque(maxlen=LATEST_DEADLETTERS)
        callbacks = {T.METRICS: self._on_metrics, T.WEIGHTS: self._on_weights, T.DEADLETTER: self._on_deadletter}
        self._tails = {t: TopicTail(bootstrap, cfg.bus.topic(t), live[cfg.bus.topic(t)], on_record=callbacks.get(t),
                                    client=client_settings(cfg.bus)) for t in self.topics}
        self._committed = CommittedOffsets(admin_config(cfg.bus, bootstrap))
        self._committed_now: dict[str, dict[int, int]] = {}  # read by the latest poll(), before the ends

    def _on_metrics(self, record: Any) -> None:
        if isinstance(record, dict) and "source" in record and "ts" in record:
            self._metrics[(record["source"], str(record.get("instance", "")))] = record

    def _on_weights(self, record: Any) -> None:
        if isinstance(record, dict) and record.get("run_name") == self.cfg.run_name:
            created = parse_ts(record.get("created_at", ""))
            if created is not None and isinstance(record.get("version"), int):
                self._announced[record["version"]] = created

    def _on_deadletter(self, record: Any) -> None:
        if not isinstance(record, dict):
            return
        self._deadletters[f"{record.get('stage', '?')}/{record.get('error', '?')}"] += 1
        self._latest_deadletters.append({k: record.get(k) for k in ("stage", "error", "reason", "topic", "partition",
                                                                    "offset", "ts")})

    def poll(self, wait_s: float = 0.05) -> None:
        """Read the groups' committed offsets, then what is new on every topic (waiting up to `wait_s` per
        topic for records in flight), and remember the end offsets with the time.

        Committed offsets first: a stage commits only records that exist, so the ends read afterwards are
        never behind them. The other way round, a running stage can commit past the end just read, and its
        lag shows 0 while it has work."""
        self._committed_now = self._read_committed()
        for topic, tail in self._tails.items():
            tail.poll(wait_s)
            now = time.monotonic()
            history = self._history[topic]
            history.append((now, sum(tail.next_offsets.values())))
            while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_S:
                history.popleft()

    def _read_committed(self) -> dict[str, dict[int, int]]:
        """{stage: its group's committed offsets on its input topic}."""
        return {stage: self._committed.get(f"{self.cfg.bus.group_prefix}.{stage}", self.cfg.bus.topic(topic),
                                           range(self._tails[topic].partitions))
                for stage, topic in STAGE_INPUTS.items() if topic in self._tails}

    def _lag(self) -> list[StageLag]:
        rows = []
        for stage, topic in STAGE_INPUTS.items():
            if topic not in self._tails:
                continue
            group = f"{self.cfg.bus.group_prefix}.{stage}"
            live = self.cfg.bus.topic(topic)
            tail = self._tails[topic]
            committed = self._committed_now.get(stage, {})
            if not committed and stage not in PIPELINE_STAGES:
                continue  # a diagnostics stage that never ran
            end = sum(tail.next_offsets.values())
            rows.append(StageLag(stage, group, live, end, sum(committed.values()) if committed else None,
                                 group_lag(tail.next_offsets, committed)))
        return rows

    def snapshot(self) -> Snapshot:
        now = time.time()
        snap = Snapshot(ts=now, bootstrap=self.bootstrap)
        snap.topics = [TopicStatus(self.cfg.bus.topic(t), self._history[t][-1][1] if self._history[t] else 0,
                                   rate(self._history[t])) for t in self.topics]
        snap.lag = self._lag()
        snap.deadletters = sum(self._deadletters.values())
        snap.deadletters_by = dict(self._deadletters.most_common())
        snap.latest_deadletters = list(reversed(self._latest_deadletters))
        snap.latest_policy_version = max(self._announced, default=None)
        for (source, _), record in sorted(self._metrics.items()):
            if source == "learner":
                snap.learner.append(learner_status(record, now))
            else:
                snap.workers.append(worker_status(record, now, self._announced))
        return snap

    def close(self) -> None:
        for tail in self._tails.values():
            tail.close()
        self._committed.close()


# --------------------------------------------------------------------------- rendering


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(snap: Snapshot, stale_after_s: float) -> Any:
    """The snapshot as rich tables (topics, lag, workers, learner, dead letters); a process not heard
    from for `stale_after_s` is dimmed."""
    from rich.console import Group
    from rich.table import Table

    topics = Table(title="topics", title_justify="left")
    for col in ("topic", "records", "records/s"):
        topics.add_column(col, justify="left" if col == "topic" else "right")
    for t in snap.topics:
        topics.add_row(t.topic, _num(t.records), _num(t.records_per_s, "{:,.1f}"))

    lag = Table(title="consumer lag (committed vs end)", title_justify="left")
    for col in ("stage", "input topic", "committed", "end", "lag"):
        lag.add_column(col, justify="left" if col in ("stage", "input topic") else "right")
    for row in snap.lag:
        style = "yellow" if row.lag else None
        lag.add_row(row.stage, row.topic, _num(row.committed) if row.committed is not None else "never",
                    _num(row.end), _num(row.lag), style=style)

    workers = Table(title="workers (latest sip.metrics record)", title_justify="left")
    for col in ("stage", "instance", "consumed", "dead", "policy", "policy age", "seen"):
        workers.add_column(col, justify="left" if col in ("stage", "instance") else "right")
    for w in snap.workers:
        behind = ""
        if w.policy_version is not None and snap.latest_policy_version is not None:
            behind = f" (−{snap.latest_policy_version - w.policy_version})" if w.policy_version < snap.latest_policy_version else ""
        workers.add_row(w.source, w.instance, _num(w.consumed), _num(w.deadlettered),
                        "—" if w.policy_version is None else f"v{w.policy_version}{behind}",
                        "initial" if w.policy_version == 0 else _age(w.policy_age_s), _age(w.last_seen_s) + " ago",
                        style="dim" if w.last_seen_s > stale_after_s else None)

    learner = Table(title="learner", title_justify="left")
    for col in ("instance", "step", "policy", "loss", "reward margin", "tokens/s", "seen"):
        learner.add_column(col, justify="left" if col == "instance" else "right")
    for row in snap.learner:
        learner.add_row(row.instance, _num(row.step), "—" if row.policy_version is None else f"v{row.policy_version}",
                        _num(row.loss, "{:.4f}"), _num(row.reward_margin, "{:+.4f}"), _num(row.tokens_per_s, "{:,.0f}"),
                        _age(row.last_seen_s) + " ago")

    dead = Table(title=f"dead letters: {snap.deadletters}"
                 + (" (" + ", ".join(f"{k} {n}" for k, n in snap.deadletters_by.items()) + ")" if snap.deadletters else ""),
                 title_justify="left")
    for col in ("stage", "error", "source", "reason"):
        dead.add_column(col, overflow="fold" if col == "reason" else "ellipsis")
    for d in snap.latest_deadletters:
        dead.add_row(str(d["stage"]), str(d["error"]), f"{d['topic']}[{d['partition']}]@{d['offset']}",
                     str(d["reason"])[:200])

    stamp = dt.datetime.fromtimestamp(snap.ts).strftime("%H:%M:%S")
    parts: list[Any] = [f"[bold]sipstream status[/bold]  {snap.bootstrap}  {stamp}  latest policy "
                        + ("—" if snap.latest_policy_version is None else f"v{snap.latest_policy_version}"),
                        topics, lag]
    parts += [t for t, rows in ((workers, snap.workers), (learner, snap.learner)) if rows]
    parts.append(dead)
    return Group(*parts)


def run_status(cfg: Config, bootstrap: str, *, as_json: bool = False, once: bool = False, interval_s: float = 2.0,
               console: Any = None) -> Snapshot:
    """Print one snapshot (`once`, `as_json`) or a live view until Ctrl-C; returns the last snapshot."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    stale_after_s = 3 * cfg.runner.metrics_interval_s + interval_s  # a few missed metrics records

    def poll_or_fail(wait_s: float = 0.05) -> None:
        try:
            watcher.poll(wait_s)
        except KafkaException as exc:
            raise UserError(f"the broker at {bootstrap} did not answer in time ({exc.args[0]}); it may be "
                            "overloaded: try again, or with a longer --interval") from None

    watcher = StatusWatcher(cfg, bootstrap)
    try:
        poll_or_fail()
        if as_json or once:
            time.sleep(interval_s)  # a second reading, for the rates
            poll_or_fail(0.2)
            snap = watcher.snapshot()
            if as_json:
                print(json.dumps(snap.as_dict(), indent=2), flush=True)
            else:
                console.print(render(snap, stale_after_s))
            return snap
        snap = watcher.snapshot()
        try:
            with Live(render(snap, stale_after_s), console=console, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(interval_s)
                    try:
                        watcher.poll()
                    except KafkaException:
                        continue  # a slow broker: keep showing the last reading and try again
                    snap = watcher.snapshot()
                    live.update(render(snap, stale_after_s))
        except KeyboardInterrupt:
            return snap
    finally:
        watcher.close()
