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

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from sipstream.bus import topics as T
from sipstream.bus.client import producer_config
from sipstream.bus.embedded import resolve_bootstrap
from sipstream.bus.fetch import RecordFetcher, require_topics
from sipstream.bus.runner import StageRunner
from sipstream.config import apply_overrides, merged
from sipstream.errors import UserError
from sipstream.learner.loop import run_learner
from sipstream.learner.reader import PairReader
from sipstream.replay.export import (
    export_topic,
    put_back,
    translate_offset,
)
from sipstream.replay.source import (
    ARCHIVE_DIR,
    LIVE_RUN_HINT,
    archived,
    check_archive,
    pipeline_of,
    recorded_config,
    replay_broker,
    stamp,
)
from sipstream.runs import manifest as M
from sipstream.runs.consumption import iter_records, read_log
from sipstream.stages import build_stage, stage_class
from sipstream.telemetry.logs import get_logger

# --------------------------------------------------------------------------- reading recorded records


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


# --------------------------------------------------------------------------- the learner, replayed


def _replay_reader_class() -> type:

    class ReplayPairReader(PairReader):
        """A `PairReader` whose records come from a recorded (partition, offset) sequence.

        Produces (weights, metrics, dead letters) go to the replay's own topics; nothing is committed."""

        def __init__(self, cfg: Any, bootstrap: str, positions: dict[int, int], instance_id: str, log: Any, *,
                     source_topic: str, sequence: Sequence[tuple[int, int]], fetcher: RecordFetcher) -> None:


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

    if run is not None:
        given_dir, given = M.load_manifest(run)
        archive = archived(given_dir, given)
        run_dir, data = M.learner_manifest(given_dir, given)
        threads = pipeline_of(run_dir, data)[1].get("threads", {}).get("learner")
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

    default_parent = run_dir.parent if run_dir is not None else Path(cfg.run_dir)
    replay_cfg = merged(
        cfg, run_name=f"{cfg.run_name}-replay-{tag}", run_dir=str(Path(out_dir) if out_dir else default_parent),
        bus={"bootstrap_servers": bootstrap, "topic_prefix": f"replay-{tag}.{cfg.bus.topic_prefix}",
             "group_prefix": f"{cfg.bus.group_prefix}.replay-{tag}"},
        learner=lcfg,
    )
    replay_cfg = apply_overrides(replay_cfg, overrides)
    same_policy = replay_cfg.models.policy.model_dump(mode="json") == cfg.models.policy.model_dump(mode="json")

    if src.archive is not None:
        # The recorded pairs back on a bus, under the replay's prefix; the recorded offsets translated.

        pairs_map = put_back(str(src.archive), replay_cfg, bootstrap, [T.PAIRS])[T.PAIRS]
        sequence = [(p, translate_offset(pairs_map, T.PAIRS, p, o)) for p, o in sequence]
        source_topic = replay_cfg.bus.topic(T.PAIRS)

    specs = T.load_specs(T.topics_dir(replay_cfg.bus))
    # Fail before training when the topic, or the recorded range, is no longer on the broker.
    require_topics(replay_cfg.bus, bootstrap, {source_topic: sorted({p for p, _ in sequence})}, LIVE_RUN_HINT)
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
    stage_cls = stage_class(name)  # an unknown name fails before anything is read
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
                           LIVE_RUN_HINT)
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


    tag = stamp()
    prefix = f"replay-{tag}.{cfg.bus.topic_prefix}"
    replay_cfg = apply_overrides(merged(
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
