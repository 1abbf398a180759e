"""Replay: re-run a recorded run from what the bus kept.

`replay_learner` re-consumes exactly the `sip.pairs` records a learner run looked at — in the order of
its consumption log, each read by (partition, offset) with assign() — from the same initial weights,
seeds and config, into a new run directory. On CPU the final weights are bit-identical to the
original's (same sha256) when the algorithm is unchanged.

With `algo` overridden, the new algorithm reads the *same record sequence* in the same order and
forms its own steps from it: `batch_pairs × grad_accum` usable pairs per step, after its own skip
rules (DPO skips exact ties, NLL skips pairs under `pairs.nll_min_total`, `pretrain` never treats a
pair as stale; duplicates and invalid records are skipped by every algorithm). So two algorithms see
identical data in identical order; their step boundaries differ only where their skips differ, and
a final short step trains what is left. `max_steps` is lifted: the sequence decides where it ends.

`replay_stage` re-runs one stage over its recorded input range into fresh topics under a new
`bus.topic_prefix` (`replay-<stamp>.`), leaving the original topics untouched.

Nothing here writes to the original run: a replay gets its own run directory, weight store,
checkpoints, consumer groups and output topics (`replay-<stamp>.<prefix>sip.weights`, ...).

A default `sipstream run` talks to an in-memory embedded broker that ends with it; it archives every
topic into `RUN_DIR/export/` and marks its manifest `bus.ephemeral`. A replay of such a run puts the
records it reads back from that archive onto the broker it is given (`bootstrap`), or onto an
embedded broker it starts for the replay, and translates the recorded offsets (see `export.put_back`).
A stage replay on its own embedded broker archives its topics in turn, into its own `export/`.

Everything a replay reads is checked before anything is created or trained: the broker answers, and
holds the recorded topics and partitions (or the archive holds them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sipstream import manifest as M
from sipstream.bus import topics as T
from sipstream.errors import UserError
from sipstream.logs import get_logger

# --------------------------------------------------------------------------- reading recorded records


def retention_error(topic: str, partition: int, wanted: int, first: int) -> UserError:
    return UserError(
        f"{topic} partition {partition}: the run recorded offsets from {wanted}, but the broker's first retained "
        f"record is now {first} (records {wanted}..{first - 1} were deleted by retention); keep replayable topics "
        f"forever with retention.ms=-1 (`kafka-configs --alter --entity-type topics --entity-name {topic} "
        "--add-config retention.ms=-1`, as topics/*.yaml set it), or archive runs with `sipstream export` and "
        "replay them from `sipstream import`")


#: What to do when a run's recorded topics are not on the broker a replay was pointed at.
_LIVE_RUN_HINT = ("replay on the cluster that holds the run (--bootstrap-servers), or put an export of it back "
                  "first with `sipstream import`")


def require_topics(bus: Any, bootstrap: str, wanted: dict[str, list[int]], hint: str, timeout: float = 10.0) -> None:
    """Fail at once, in one line, when the broker at `bootstrap` does not answer, or lacks a topic or a
    partition in `wanted` ({live topic name: partitions}): reading it would only wait for records that
    never come. `hint` says what to do instead."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient

    from sipstream.bus.client import admin_config, check_reachable

    check_reachable(bus, bootstrap, timeout)
    # All topics, not the wanted ones by name: asking for a topic by name auto-creates it on some brokers.
    metadata = AdminClient(admin_config(bus, bootstrap) | {"log_level": 0}).list_topics(timeout=timeout)
    for topic, partitions in wanted.items():
        found = metadata.topics.get(topic)
        if found is None or (found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise UserError(f"topic {topic} does not exist on {bootstrap}; {hint}")
        absent = sorted(set(partitions) - set(found.partitions))
        if absent:
            raise UserError(f"topic {topic} on {bootstrap} has {len(found.partitions)} partition(s), but the run "
                            f"recorded partition {absent[0]}; {hint}")


def _pipeline_of(run_dir: Path, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The `sipstream run` a learner run belongs to (its directory holds the pipeline's manifest), else itself."""
    if data.get("kind") == "learner" and (run_dir.parent / M.MANIFEST_NAME).is_file():
        try:
            parent = json.loads((run_dir.parent / M.MANIFEST_NAME).read_text(encoding="utf-8"))
        except ValueError:
            parent = {}
        if parent.get("kind") == "pipeline" and parent.get("learner_run") == run_dir.name:
            return run_dir.parent, parent
    return run_dir, data


def archived(run_dir: Path, data: dict[str, Any]) -> Path | None:
    """The archive folder of a run whose in-memory broker ended with it (None when its topics are live).

    A learner run inside a `sipstream run` directory shares the pipeline's broker, so its archive."""
    from sipstream.export import ARCHIVE_DIR

    run_dir, data = _pipeline_of(run_dir, data)
    ephemeral = data.get("bus", {}).get("ephemeral")
    if ephemeral is None and data.get("kind") == "pipeline":  # written before `bus.ephemeral` was recorded
        bus = data.get("config", {}).get("bus", {})
        ephemeral = bus.get("bootstrap_servers") is None and str(bus.get("embedded", {}).get("storage")).startswith(
            "memory://")
    return run_dir / data.get("archive", ARCHIVE_DIR) if ephemeral else None


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` torch threads (then the previous count): CPU float sums, and so the weights'
    sha256, depend on how many threads add them up. None: leave it."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_archive(archive: Path, topics: Sequence[str], run_dir: Path) -> None:
    """One line when a run's archive lacks a topic a replay needs (its broker, and the records, are gone)."""
    from sipstream.export import EXPORT_NAME

    try:
        held = json.loads((archive / EXPORT_NAME).read_text(encoding="utf-8"))["topics"]
    except (OSError, ValueError, KeyError):
        held = {}
    missing = [t for t in topics if t not in held]
    if missing:
        raise UserError(f"run {run_dir} ran on an in-memory broker that ended with it, and its archive {archive} "
                        f"holds no {', '.join(missing)}; runs made before `sipstream run` archived every topic "
                        "cannot replay this: run again, or run on a persistent broker (`sipstream broker`)")


@contextmanager
def replay_broker(cfg: Any, bootstrap: str | None) -> Iterator[tuple[str, bool]]:
    """(bootstrap, embedded): the broker given, checked; else an in-memory embedded broker for the
    duration of the replay (its records end with it)."""
    if bootstrap is not None:
        from sipstream.bus.client import check_reachable

        check_reachable(cfg.bus, bootstrap)
        yield bootstrap, False
        return
    from sipstream.bus.broker import EmbeddedBroker

    broker = EmbeddedBroker(cfg.bus.embedded.model_copy(update={"storage": "memory://tansu/", "port": 0}))
    try:
        yield broker.start(), True
    finally:
        broker.stop()


class RecordFetcher:
    """Reads records of one topic by (partition, offset), one assign()ed consumer per partition.

    Offsets are asked for in increasing order per partition (a consumption log is: within a
    partition the learner reads forward); an earlier offset re-seeks. Never relies on watermarks.
    A partition whose first record read lies *after* the offset asked for has lost that range to
    retention: a `UserError` says which and what to set."""

    def __init__(self, bus: Any, bootstrap: str, topic: str, timeout_s: float = 30.0, batch: int = 500) -> None:
        self.bus, self.bootstrap, self.topic = bus, bootstrap, topic
        self.timeout_s, self.batch = timeout_s, batch
        self.consumers: dict[int, Any] = {}
        self.buffers: dict[int, deque[Any]] = {}
        self.last: dict[int, int] = {}
        self.fresh: dict[int, bool] = {}  # True until the partition's first record was looked at

    def _open(self, partition: int, offset: int) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from sipstream.bus.client import consumer_config

        if partition in self.consumers:
            self.consumers.pop(partition).close()
        conf = consumer_config(self.bus, self.bootstrap, group_id=f"{self.bus.group_prefix}.replay-reader")
        # An offset below the log start resets to the earliest retained record: that is how a lost
        # range shows (the first record read is later than the one asked for). Nothing is committed.
        conf |= {"auto.offset.reset": "earliest", "enable.partition.eof": False}
        consumer = Consumer(conf)
        consumer.assign([TopicPartition(self.topic, partition, offset)])
        self.consumers[partition] = consumer
        self.buffers[partition] = deque()
        self.fresh[partition] = True

    def _fill(self, partition: int) -> bool:
        from confluent_kafka import KafkaError, KafkaException

        got = False
        for msg in self.consumers[partition].consume(self.batch, timeout=0.5):
            err = msg.error()
            if err is None:
                self.buffers[partition].append(msg)
                got = True
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise UserError(f"topic {self.topic} does not exist on {self.bootstrap}; replay from the cluster that "
                                "holds the run, or put an export back first with `sipstream import`")
            elif err.fatal() or not err.retriable():
                raise KafkaException(err)
        return got

    def get(self, partition: int, offset: int) -> Any:
        if partition not in self.consumers or offset <= self.last.get(partition, -1):
            self._open(partition, offset)
        buffer = self.buffers[partition]
        deadline = time.monotonic() + self.timeout_s
        while True:
            while buffer and buffer[0].offset() < offset:
                buffer.popleft()
                self.fresh[partition] = False
            if buffer:
                msg = buffer.popleft()
                if msg.offset() > offset:
                    if self.fresh[partition]:
                        raise retention_error(self.topic, partition, offset, msg.offset())
                    raise UserError(f"{self.topic} partition {partition}: the recorded record at offset {offset} is "
                                    f"gone (the next one is {msg.offset()}; was the topic compacted?); replay from an "
                                    "export (`sipstream import`)")
                self.fresh[partition] = False
                self.last[partition] = offset
                return msg
            if not self._fill(partition) and time.monotonic() > deadline:
                raise UserError(f"{self.topic} partition {partition}: no record at offset {offset} within "
                                f"{self.timeout_s:.0f}s; the topic ends before the recorded range (was it deleted and "
                                "recreated?); replay from an export (`sipstream import`)")

    def read_range(self, partition: int, start: int, end: int) -> list[Any]:
        """Every record of [start, end) (gaps, e.g. from compaction, are allowed after the first record)."""
        out = []
        if end <= start:
            return out
        self._open(partition, start)
        first = self.get(partition, start)
        out.append(first)
        buffer = self.buffers[partition]
        deadline = time.monotonic() + self.timeout_s
        while out[-1].offset() < end - 1:
            if buffer:
                msg = buffer.popleft()
                if msg.offset() >= end:
                    break
                out.append(msg)
                deadline = time.monotonic() + self.timeout_s
            elif not self._fill(partition) and time.monotonic() > deadline:
                raise UserError(f"{self.topic} partition {partition}: only {len(out)} records of the recorded range "
                                f"{start}..{end - 1} arrived within {self.timeout_s:.0f}s; the topic lost records")
        self.last[partition] = out[-1].offset()
        return out

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()


# --------------------------------------------------------------------------- the learner, replayed


def _replay_reader_class() -> type:
    from sipstream.learner.loop import PairReader

    class ReplayPairReader(PairReader):
        """A `PairReader` whose records come from a recorded (partition, offset) sequence.

        Produces (weights, metrics, dead letters) go to the replay's own topics; nothing is committed."""

        def __init__(self, cfg: Any, bootstrap: str, positions: dict[int, int], instance_id: str, log: Any, *,
                     source_topic: str, sequence: Sequence[tuple[int, int]], fetcher: RecordFetcher) -> None:
            from confluent_kafka import Producer

            from sipstream.bus.client import producer_config

            self.cfg, self.log, self.instance_id = cfg, log, instance_id
            self.specs = T.load_specs(T.topics_dir(cfg.bus))
            self.topic = source_topic
            self.delivery_errors: list[str] = []
            self.produced: dict[str, dict[int, list[int]]] = {}
            self.producer = Producer(producer_config(cfg.bus, bootstrap, client_id=instance_id))
            self.committed: dict[int, int] = {}
            self.deadlettered: Counter[str] = Counter()  # by error class, as PairReader counts them
            self.sequence = list(sequence)
            self.next = 0
            self.fetcher = fetcher

        def consume(self, count: int, timeout: float) -> list[Any]:
            taken = self.sequence[self.next:self.next + count]
            self.next += len(taken)
            self.producer.poll(0)
            return [self.fetcher.get(p, o) for p, o in taken]

        def commit(self, positions: dict[int, int]) -> None:
            """Nothing to commit: a replay never moves the original's consumer group."""

        def close(self) -> None:
            try:
                self.producer.flush(10.0)
            finally:
                self.fetcher.close()

    return ReplayPairReader


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S") + f"-{os.urandom(2).hex()}"


def apply_sets(cfg: Any, overrides: Sequence[str]) -> Any:
    """`section.field=value` strings on top of a config (validated)."""
    from sipstream.config import _parse_scalar, _set_path, merged

    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects section.field=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), _parse_scalar(raw))
    return merged(cfg, **tree) if tree else cfg


def recorded_config(data: dict[str, Any], where: Path) -> Any:
    from pydantic import ValidationError

    from sipstream.config import Config

    try:
        return Config.model_validate(data["config"])
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"the config recorded in {where} no longer validates ({'.'.join(map(str, first['loc']))}: "
                        f"{first['msg']}); fix it with --set or replay with the sipstream version that wrote it "
                        f"({data.get('code', {}).get('git_describe') or data.get('code', {}).get('package')})") from None


@dataclass
class LearnerReplay:
    run_dir: Path
    algo: str
    original_algo: str
    records: int
    steps: int
    final_sha256: str | None
    original_sha256: str | None

    @property
    def identical(self) -> bool:
        return self.final_sha256 is not None and self.final_sha256 == self.original_sha256


def parse_offsets(spec: str) -> dict[int, tuple[int, int]]:
    """`"0:0-120,1:5-98"` → {partition: (first offset, end offset exclusive)}; a bad spec is a UserError."""
    ranges: dict[int, tuple[int, int]] = {}
    for part in (p.strip() for p in spec.split(",")):
        try:
            partition, span = part.split(":")
            first, end = span.split("-")
            key, lo, hi = int(partition), int(first), int(end)
        except ValueError:
            raise UserError(f"--from-offsets: {part!r} is not PARTITION:FIRST-END (e.g. 0:0-120,1:5-98; END is "
                            "exclusive)") from None
        if key < 0 or lo < 0 or hi <= lo:
            raise UserError(f"--from-offsets: {part!r} needs a partition >= 0 and 0 <= FIRST < END")
        if key in ranges:
            raise UserError(f"--from-offsets: partition {key} is given twice")
        ranges[key] = (lo, hi)
    return ranges


def offsets_sequence(ranges: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
    """The order a `--from-offsets` replay reads its records in: round-robin over partitions by position.

    A live learner's order depends on timing; with no consumption log to follow, this order is fixed by
    the ranges alone, so two replays of the same ranges see the same sequence and train the same model."""
    cursors = {p: lo for p, (lo, _) in sorted(ranges.items())}
    out: list[tuple[int, int]] = []
    while cursors:
        for partition in list(cursors):
            out.append((partition, cursors[partition]))
            cursors[partition] += 1
            if cursors[partition] >= ranges[partition][1]:
                del cursors[partition]
    return out


@dataclass
class _Source:
    """Where a learner replay's records and config come from: a recorded run, or explicit offsets."""

    cfg: Any
    sequence: list[tuple[int, int]]
    source_topic: str
    bootstrap: str | None  # None: the run's broker is gone; its records are put back from `archive`
    original_algo: str
    original: dict[str, Any] | None  # the recorded run's manifest, when there is one
    run_dir: Path | None
    archive: Path | None = None
    threads: int | None = None  # the learner's thread count, where the run recorded it


def _learner_source(run: str | Path | None, from_offsets: str | None, config: Any, bootstrap: str | None) -> _Source:
    from sipstream.learner.consumption import iter_records, read_log

    if run is not None:
        given_dir, given = M.load_manifest(run)
        archive = archived(given_dir, given)
        run_dir, data = M.learner_manifest(given_dir, given)
        threads = _pipeline_of(run_dir, data)[1].get("threads", {}).get("learner")
        cfg = recorded_config(data, run_dir)
        if from_offsets is None:
            log_info = data["learner"]["consumption_log"]
            sequence = list(iter_records(read_log(run_dir / log_info["path"])[: log_info["lines"]]))
        else:
            sequence = offsets_sequence(parse_offsets(from_offsets))
        if archive is not None:
            check_archive(archive, [T.PAIRS], given_dir)
            return _Source(cfg, sequence, "", bootstrap, data["learner"]["algo"], data, run_dir, archive, threads)
        return _Source(cfg, sequence, data["topics"][T.PAIRS]["live_name"],
                       bootstrap or data["bus"]["bootstrap_servers"], data["learner"]["algo"], data, run_dir,
                       threads=threads)
    if from_offsets is None or config is None:
        raise UserError("replay learner needs --run RUN_DIR, or --from-offsets with the config that names the bus "
                        "and the initial policy (--config)")
    from sipstream.bus.embedded import resolve_bootstrap

    return _Source(config, offsets_sequence(parse_offsets(from_offsets)), config.bus.topic(T.PAIRS),
                   bootstrap or resolve_bootstrap(config), config.learner.algo, None, None)


def replay_learner(run: str | Path | None = None, *, bootstrap: str | None = None, algo: str | None = None,
                   overrides: Sequence[str] = (), out_dir: str | Path | None = None,
                   handle_signals: bool = True, from_offsets: str | None = None, config: Any = None) -> LearnerReplay:
    """Train again on exactly the records a learner run consumed; returns where and what came out.

    `from_offsets` ("0:0-120,1:5-98") replaces the run's consumption log by explicit `sip.pairs` ranges,
    read in `offsets_sequence` order: with `run`, on that run's config and initial weights; without it,
    on `config` (a run directory that was lost, a range picked by hand). A run whose in-memory broker
    is gone replays from its archive (see the module docstring)."""
    with ExitStack() as stack:
        return _replay_learner(stack, run, bootstrap, algo, overrides, out_dir, handle_signals, from_offsets, config)


def _replay_learner(stack: ExitStack, run: str | Path | None, bootstrap: str | None, algo: str | None,
                    overrides: Sequence[str], out_dir: str | Path | None, handle_signals: bool,
                    from_offsets: str | None, config: Any) -> LearnerReplay:
    from sipstream.learner.loop import run_learner

    src = _learner_source(run, from_offsets, config, bootstrap)
    cfg, sequence, source_topic = src.cfg, src.sequence, src.source_topic
    data, run_dir, original_algo = src.original, src.run_dir, src.original_algo
    if src.archive is None:
        bootstrap = src.bootstrap
    else:
        bootstrap, _ = stack.enter_context(replay_broker(cfg, src.bootstrap))
    assert bootstrap is not None

    tag = stamp()
    lcfg = {"checkpoint_dir": None, "weight_store": None, "max_steps": None, "idle_timeout_s": 0.001}
    if algo is not None and algo != original_algo:
        lcfg["algo"] = algo
        if algo != "dpo":  # DPO-only knobs have no meaning for the other losses
            lcfg |= {"nll_mix": 0.0, "reference_refresh_every": None}
    from sipstream.config import merged

    default_parent = run_dir.parent if run_dir is not None else Path(cfg.run_dir)
    replay_cfg = merged(
        cfg, run_name=f"{cfg.run_name}-replay-{tag}", run_dir=str(Path(out_dir) if out_dir else default_parent),
        bus={"bootstrap_servers": bootstrap, "topic_prefix": f"replay-{tag}.{cfg.bus.topic_prefix}",
             "group_prefix": f"{cfg.bus.group_prefix}.replay-{tag}"},
        learner=lcfg,
    )
    replay_cfg = apply_sets(replay_cfg, overrides)
    same_policy = replay_cfg.models.policy.model_dump(mode="json") == cfg.models.policy.model_dump(mode="json")

    if src.archive is not None:
        # The recorded pairs back on a bus, under the replay's prefix; the recorded offsets translated.
        from sipstream.export import translate_offset, put_back

        pairs_map = put_back(str(src.archive), replay_cfg, bootstrap, [T.PAIRS])[T.PAIRS]
        sequence = [(p, translate_offset(pairs_map, T.PAIRS, p, o)) for p, o in sequence]
        source_topic = replay_cfg.bus.topic(T.PAIRS)

    specs = T.load_specs(T.topics_dir(replay_cfg.bus))
    # Fail before training when the topic, or the recorded range, is no longer on the broker.
    require_topics(replay_cfg.bus, bootstrap, {source_topic: sorted({p for p, _ in sequence})}, _LIVE_RUN_HINT)
    probe = RecordFetcher(replay_cfg.bus, bootstrap, source_topic)
    try:
        firsts: dict[int, int] = {}
        for partition, offset in sequence:
            firsts[partition] = min(offset, firsts.get(partition, offset))
        for partition, first in firsts.items():
            probe.get(partition, first)
    finally:
        probe.close()
    T.create_topics(replay_cfg.bus, bootstrap, {n: specs[n] for n in (T.WEIGHTS, T.METRICS, T.DEADLETTER)})

    reader_class = _replay_reader_class()

    def reader(*args: Any) -> Any:
        fetcher = RecordFetcher(replay_cfg.bus, bootstrap, source_topic)
        return reader_class(*args, source_topic=source_topic, sequence=sequence, fetcher=fetcher)

    original_sha = (data["learner"].get("final_weights") or {}).get("sha256") if data else None
    get_logger(component="replay").info("replaying learner", run=str(run_dir), from_offsets=from_offsets,
                                        records=len(sequence), algo=replay_cfg.learner.algo, into=replay_cfg.run_name,
                                        threads=src.threads)
    extra = {"replay_of": {"run_dir": str(run_dir.resolve()) if run_dir else None,
                           "run_name": data["run_name"] if data else None, "algo": original_algo,
                           "final_sha256": original_sha, "records": len(sequence),
                           "from_offsets": {"topic": source_topic, "ranges": from_offsets} if from_offsets else None,
                           "from_archive": str(src.archive.resolve()) if src.archive else None}}
    initial = data["models"]["policy"]["initial_sha256"] if data and same_policy else None
    with torch_threads(src.threads):
        state = run_learner(replay_cfg, bootstrap, learner=replay_cfg.learner, pair_reader=reader,
                            handle_signals=handle_signals, manifest_extra=extra, expect_initial_sha256=initial)
    new_dir = Path(replay_cfg.run_dir) / replay_cfg.run_name
    _, new = M.load_manifest(new_dir)
    return LearnerReplay(run_dir=new_dir, algo=replay_cfg.learner.algo, original_algo=original_algo,
                         records=len(sequence), steps=state.step,
                         final_sha256=(new["learner"].get("final_weights") or {}).get("sha256"),
                         original_sha256=original_sha)


# --------------------------------------------------------------------------- one stage, replayed


@dataclass
class StageReplay:
    stage: str
    run_dir: Path
    topic_prefix: str
    input_records: int
    output_records: int
    deadlettered: int
    archive: Path | None = None  # where the replay's topics were archived (it ran on its own in-memory broker)


def copy_range(fetcher: RecordFetcher, producer: Any, target: str, partitions: dict[str, list[int]]) -> int:
    """Copy recorded records to `target`, each to its original partition, in offset order."""
    copied = 0
    for partition, (start, end) in sorted(partitions.items(), key=lambda kv: int(kv[0])):
        for msg in fetcher.read_range(int(partition), start, end):
            producer.produce(target, value=msg.value(), key=msg.key(), partition=msg.partition())
            producer.poll(0)
            copied += 1
    return copied


def replay_stage(name: str, run: str | Path, *, bootstrap: str | None = None, overrides: Sequence[str] = (),
                 out_dir: str | Path | None = None, timeout_s: float = 3600.0) -> StageReplay:
    """Run stage `name` again over the input range a run recorded, into topics under a new prefix.

    The recorded input records (and the stage's control topics, e.g. sip.weights for rollout, where
    the run recorded them) are copied to `replay-<stamp>.<prefix>` topics, the stage processes them
    there with its own consumer group, and the replay's manifest records the output range. `overrides`
    (`section.field=value`) change the stage, e.g. another judge model. A run whose in-memory broker
    is gone replays from its archive, on `bootstrap` or on an embedded broker started for the replay."""
    stage_cls = M.stage_class(name)  # an unknown name fails before anything is read
    run_dir, data = M.load_manifest(run)
    cfg = recorded_config(data, run_dir)
    recorded = data.get("topics", {})
    if stage_cls.input_topic not in recorded:
        raise UserError(f"run {run_dir} recorded no range of {stage_cls.input_topic}, the input of stage {name}; "
                        "pass the run directory of `sipstream run` (its manifest records every pipeline topic)")
    # Control topics the run did not record (e.g. no weights were published): the stage starts without them.
    inputs = [t for t in (stage_cls.input_topic, *stage_cls.control_topics) if t in recorded]
    archive = archived(run_dir, data)
    with ExitStack() as stack:
        if archive is None:
            bootstrap = bootstrap or data["bus"]["bootstrap_servers"]
            require_topics(cfg.bus, bootstrap,
                           {recorded[t]["live_name"]: [int(p) for p in recorded[t]["partitions"]] for t in inputs},
                           _LIVE_RUN_HINT)
            embedded = False
        else:
            check_archive(archive, inputs, run_dir)
            bootstrap, embedded = stack.enter_context(replay_broker(cfg, bootstrap))
        return _replay_stage(name, run_dir, data, cfg, inputs, bootstrap, archive, embedded, overrides, out_dir,
                             timeout_s)


def _replay_stage(name: str, run_dir: Path, data: dict[str, Any], cfg: Any, inputs: list[str], bootstrap: str,
                  archive: Path | None, embedded: bool, overrides: Sequence[str], out_dir: str | Path | None,
                  timeout_s: float) -> StageReplay:
    """`replay_stage` once its input is known to be readable: from the live topics, or from `archive`."""
    from confluent_kafka import Producer

    from sipstream.bus.client import producer_config
    from sipstream.bus.runner import StageRunner
    from sipstream.config import merged
    from sipstream.export import ARCHIVE_DIR, export_topic, put_back
    from sipstream.stages import build_stage

    tag = stamp()
    prefix = f"replay-{tag}.{cfg.bus.topic_prefix}"
    replay_cfg = apply_sets(merged(
        cfg, run_name=f"{cfg.run_name}-replay-{name}-{tag}", run_dir=str(Path(out_dir) if out_dir else run_dir.parent),
        bus={"bootstrap_servers": bootstrap, "topic_prefix": prefix, "group_prefix": f"{cfg.bus.group_prefix}.replay-{tag}"},
    ), overrides)
    stage = build_stage(name, replay_cfg)
    specs = T.load_specs(T.topics_dir(replay_cfg.bus))
    T.create_topics(replay_cfg.bus, bootstrap, specs)

    log = get_logger(component="replay", stage=name)
    recorded = data["topics"]
    copied: dict[str, int] = {}
    if archive is not None:
        maps = put_back(str(archive), replay_cfg, bootstrap, inputs)
        copied = {t: sum(len(m) for m in maps[t].values()) for t in inputs}
    else:
        producer = Producer(producer_config(replay_cfg.bus, bootstrap, client_id=f"replay-{name}"))
        for topic in inputs:
            fetcher = RecordFetcher(cfg.bus, bootstrap, recorded[topic]["live_name"])
            try:
                copied[topic] = copy_range(fetcher, producer, replay_cfg.bus.topic(topic), recorded[topic]["partitions"])
            finally:
                fetcher.close()
        if producer.flush(60):
            raise UserError(f"copying the recorded input of stage {name} to {prefix}: records unacknowledged by {bootstrap}")
    wanted = copied[stage.input_topic]
    log.info("replaying stage", run=str(run_dir), records=wanted, topic_prefix=prefix,
             from_archive=str(archive) if archive else None)

    deadline = time.monotonic() + timeout_s
    runner = StageRunner(stage, replay_cfg, bootstrap, instance_id=f"replay-{name}-{tag}", specs=specs)
    stats = runner.run(until=lambda s: s.counters["consumed"] >= wanted or time.monotonic() > deadline)  # closes the stage
    if stats.counters["consumed"] < wanted:
        raise UserError(f"stage {name} processed {stats.counters['consumed']} of {wanted} records within "
                        f"{timeout_s:.0f}s; its partial output is under topic prefix {prefix}")

    outputs = [t for t in (stage.output_topic, T.DEADLETTER) if t]
    ranges = M.read_ends(bootstrap, replay_cfg.bus, [*copied, *outputs])
    new_dir = Path(replay_cfg.run_dir) / replay_cfg.run_name
    manifest = {
        "format": M.FORMAT, "kind": "stage-replay", "created_at": M.now(), "run_name": replay_cfg.run_name,
        "stage": name, "config": replay_cfg.model_dump(mode="json"), "code": M.code_version(),
        "seeds": {"root": replay_cfg.seed},
        "bus": {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "ephemeral": embedded},
        "topics": {t: M.topic_entry(replay_cfg.bus.topic(t), "consumed" if t in copied else "produced", ranges[t])
                   for t in ranges},
        "replay_of": {"run_dir": str(run_dir.resolve()), "run_name": data["run_name"], "overrides": list(overrides),
                      "from_archive": str(archive.resolve()) if archive else None},
        **({"archive": ARCHIVE_DIR} if embedded else {}),
    }
    M.write_json(new_dir / M.MANIFEST_NAME, manifest)
    if embedded:  # the replay's broker ends with it: keep what it wrote, as `sipstream run` does
        for topic in ranges:
            export_topic(topic, new_dir, str(new_dir / ARCHIVE_DIR), bootstrap=bootstrap)
    return StageReplay(stage=name, run_dir=new_dir, topic_prefix=prefix, input_records=wanted,
                       output_records=manifest["topics"].get(stage.output_topic, {}).get("records", 0),
                       deadlettered=manifest["topics"].get(T.DEADLETTER, {}).get("records", 0),
                       archive=new_dir / ARCHIVE_DIR if embedded else None)
