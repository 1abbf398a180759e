"""The learner: one loop, top to bottom, in phases.

    consume (a step's pairs from sip.pairs) → loss (forward, backward per micro-batch) → step (clip,
    AdamW, schedule) → publish (every `sync_every` steps: weight store, then sip.weights) →
    checkpoint (every `checkpoint_every` steps) → commit (the offsets that checkpoint covers)

The phases' pieces live beside this module: `sipstream.learner.reader` (the bus side: `PairReader`,
`consume_step`), `sipstream.learner.policy` (the model, the loss over micro-batches, the optimizer step),
`sipstream.learner.record` (the consumption log and manifest). This module sets them up and runs them.

Delivery guarantee: **every pair is trained exactly once within a run**, across crashes. The
learner does not rely on the group's committed offsets to resume: it `assign()`s every partition of
`sip.pairs` at the offsets stored in its latest checkpoint together with the model, optimizer,
scheduler, RNG states and the dedupe window, so after `kill -9` it re-reads exactly the records that
came after the state it restored. Offsets are committed to the group only after the checkpoint that
covers them (for monitoring, and as the start of a run without a checkpoint). Duplicate items from
upstream at-least-once delivery are skipped by `item_id`. Every record looked at is accounted: trained,
or counted under the reason it was dropped (dead-lettered, duplicate, tie, stale, empty). A stop request
(SIGTERM/SIGINT) finishes the step in hand: its pairs are trained and its records accounted.

Weight versions only move forward for a `run_name`, across restarts: a learner numbers its next
publication after the newest version announced on sip.weights (see `number_after_announced`).

A step's composition is a function of the record order the consumer sees; within a partition that
order is fixed, so a replay of one partition (or of the same interleaving) gives the same weights
bit for bit on CPU. That interleaving is recorded: every accounted batch appends the (partition,
offset) of each record it looked at to `<run_dir>/consumption.jsonl` (fsync'd with each checkpoint),
and `<run_dir>/manifest.json` holds the config, code version, initial-weights hash, seeds and topic
ranges (`sipstream.learner.record`); `sipstream replay learner` feeds the same sequence back.

Runs as one process, or under torchrun with DDP (see `sipstream.learner.distributed`; the single
process never touches torch.distributed).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sipstream.bus import topics as T
from sipstream.bus.dedupe import SeenIds
from sipstream.bus.records import weights_announcement
from sipstream.config.learner import LearnerConfig
from sipstream.errors import UserError
from sipstream.learner.checkpoint import (
    LearnerState,
    load_latest,
    save_checkpoint,
    set_rng_state,
)
from sipstream.learner.distributed import (
    DistInfo,
    StepChannel,
    init_distributed,
    shutdown,
    sum_over_ranks,
)
from sipstream.learner.losses import ALGOS
from sipstream.learner.policy import (
    Policy,
    accumulate_gradients,
    build_policy,
    optimizer_step,
    resolve_device,
    step_weight,
)
from sipstream.learner.reader import (
    PairReader,
    StepInput,
    announced_version,
    consume_step,
)
from sipstream.learner.record import RunRecord
from sipstream.learner.weights import (
    WeightStore,
    config_hash,
    load_state_into,
    unique_state_dict,
)
from sipstream.runs.manifest import tensors_sha256, tokenizer_sha256
from sipstream.telemetry.health import start_health_server
from sipstream.telemetry.logs import get_logger
from sipstream.telemetry.metrics import ProcessMetrics


def resolve_learner_config(cfg: Any, learner: LearnerConfig | None) -> LearnerConfig:
    """`learner` if given, else `cfg.learner` (validated as this module's LearnerConfig)."""
    if learner is not None:
        return learner
    if isinstance(cfg.learner, LearnerConfig):
        return cfg.learner
    return LearnerConfig.model_validate(cfg.learner.model_dump())


# --------------------------------------------------------------------------- set up


def initial_weights_sha256(policy: Policy, cfg: Any, dist: DistInfo, expect: str | None) -> str:
    """The initial weights' hash, before any checkpoint is restored: what a replay must start from."""
    initial = tensors_sha256(unique_state_dict(policy.model)) if dist.is_main else ""
    if expect is not None and dist.is_main and initial != expect:
        raise UserError(f"models.policy.source {cfg.models.policy.source!r} now builds initial weights with sha256 "
                        f"{initial[:12]}…, the recorded run started from {expect[:12]}…; "
                        "point models.policy.source at the original checkpoint (--set models.policy.source=...)")
    return initial


def restore_checkpoint(policy: Policy, checkpoint_dir: Path, this_config: str, log: Any) -> LearnerState | None:
    """Load the latest checkpoint into `policy` (model, reference, optimizer, schedule, RNG); its state,
    or None when there is none."""
    checkpoint = load_latest(checkpoint_dir)
    if checkpoint is None:
        return None
    load_state_into(policy.model, checkpoint.model_tensors)
    if checkpoint.reference_tensors is not None and policy.reference is not None:
        load_state_into(policy.reference, checkpoint.reference_tensors)
    policy.optimizer.load_state_dict(checkpoint.trainer_state["optimizer"])
    policy.scheduler.load_state_dict(checkpoint.trainer_state["scheduler"])
    set_rng_state(checkpoint.trainer_state["rng"])
    state = checkpoint.state
    if state.config_hash != this_config:
        log.warning("resuming a checkpoint written under a different learner config",
                    checkpoint=str(checkpoint.path), was=state.config_hash, now=this_config)
        state.config_hash = this_config
    log.info("resumed", checkpoint=str(checkpoint.path), step=state.step, policy_version=state.version,
             positions=state.positions)
    return state


def number_after_announced(state: LearnerState, cfg: Any, bootstrap: str, log: Any) -> None:
    """Make the next publication's version follow the newest one announced for `cfg.run_name`.

    A learner killed after publishing and before checkpointing restarts from an older state (or from
    none): without this it would announce versions a rollout worker already saw (v1–v5 twice), which
    the worker ignores as old. A restarted learner without a checkpoint re-trains from the start
    weights (the initial policy, re-reading sip.pairs from the group's committed offsets); only the
    version number moves forward: its first publication after v5 is v6. Staleness is measured against
    that number, as the workers' pairs carry it."""
    announced = announced_version(cfg.bus, bootstrap, cfg.run_name, log)
    if announced > state.version:
        log.warning("versions were announced after the restored state; numbering after them",
                    policy_version=state.version, announced=announced, step=state.step)
        state.version = announced


class Learner:
    """One learner process: what the phases share (policy, state, the bus side, the run's record).

    Rank 0 reads, publishes, checkpoints and records; under DDP the other ranks only train."""

    def __init__(self, cfg: Any, lcfg: LearnerConfig, bootstrap: str, dist: DistInfo, *, instance_id: str | None,
                 pair_reader: Callable[..., PairReader] | None, expect_initial_sha256: str | None,
                 manifest_extra: dict[str, Any] | None) -> None:
        import torch

        self.cfg, self.lcfg, self.dist, self.algo = cfg, lcfg, dist, ALGOS[lcfg.algo]
        self.instance_id = instance_id or f"learner-{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger(stage="learner", instance=self.instance_id, rank=dist.rank, algo=lcfg.algo)
        run_dir = Path(cfg.run_dir) / cfg.run_name
        self.checkpoint_dir = lcfg.checkpoint_dir or run_dir / "learner"
        self.weight_root = lcfg.weight_store or (run_dir / "weights").resolve().as_uri()
        self.config_hash = config_hash({"learner": lcfg.model_dump(mode="json"), "seed": cfg.seed,
                                        "policy": cfg.models.policy.model_dump(mode="json")})
        self.metrics = ProcessMetrics("learner", run=cfg.run_name, stage="learner")

        # --- the policy, reference, optimizer; then the latest checkpoint, if any ---
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        load_started = time.perf_counter()
        self.policy = build_policy(cfg.models.policy, lcfg, dist)
        self.metrics.set("sipstream_model_load_seconds", time.perf_counter() - load_started)
        initial_sha256 = initial_weights_sha256(self.policy, cfg, dist, expect_initial_sha256)
        restored = restore_checkpoint(self.policy, self.checkpoint_dir, self.config_hash, self.log)
        self.state = restored or LearnerState(config_hash=self.config_hash)
        if dist.is_main:
            number_after_announced(self.state, cfg, bootstrap, self.log)
        self.seen = SeenIds(lcfg.dedupe_capacity)
        for item_id in self.state.seen_ids:
            self.seen.first_time(item_id)
        self.counters: Counter[str] = Counter(self.state.counters)

        # --- rank 0: the bus side, the weight store, and the record of the run (for replay) ---
        self.reader = ((pair_reader or PairReader)(cfg, bootstrap, self.state.positions, self.instance_id, self.log)
                       if dist.is_main else None)
        self.store = WeightStore(self.weight_root, cfg.run_name, lcfg.weight_store_options) if dist.is_main else None
        self.record = RunRecord(run_dir, cfg, lcfg, bootstrap, self.state, initial_sha256=initial_sha256,
                                tokenizer_sha256=tokenizer_sha256(self.policy.tokenizer.tokenizer),
                                extra=manifest_extra) if self.reader is not None else None

        self.stop_requested = False
        self.steps_channel = StepChannel(dist, lcfg.dist_timeout_s)
        self.gauges: dict[str, float | None] = {}
        self.interval_tokens, self.last_metrics = 0.0, time.monotonic()
        # /livez, /readyz, /metrics on rank 0 only (one port per machine). Started once set-up succeeded, so
        # a failed start leaves no server behind; a Kubernetes startupProbe covers the model load.
        self.health = start_health_server(cfg.runner.health_port if dist.is_main else None, cfg.runner.health_host,
                                          metrics=self.metrics.text, stale_after_s=cfg.runner.health_stale_after_s)

    def request_stop(self, *_: Any) -> None:
        """The SIGTERM/SIGINT handler: only sets a flag; the step in hand finishes first."""
        self.stop_requested = True

    def stopping(self) -> bool:
        self.health.beat()  # called on every poll, also while waiting for pairs: the loop is alive
        self.steps_channel.keepalive()  # under DDP: the other ranks wait for this step in a collective
        return self.stop_requested

    # ----------------------------------------------------------------------- consume

    def consume(self) -> StepInput:
        """Rank 0 reads the step's pairs; every rank gets them (a sync point under DDP)."""
        batch = None
        if self.reader is not None:
            batch = consume_step(self.reader, self.state, self.seen, self.algo, self.lcfg, self.policy.tokenizer,
                                 self.policy.max_seq_tokens, self.stopping)
        return self.steps_channel.send(batch)

    # ----------------------------------------------------------------------- loss and step

    def train(self, batch: StepInput) -> None:
        """Forward + backward of every micro-batch (the loss is the mean over the step), then clip, AdamW,
        schedule. The step's sums are added over ranks: a sync point under DDP."""
        policy, dist, lcfg = self.policy, self.dist, self.lcfg
        started = time.perf_counter()
        sums = accumulate_gradients(policy, self.algo, lcfg, batch.examples[dist.rank::dist.world_size],
                                    step_weight(self.algo, batch.examples), dist)
        grad_norm = optimizer_step(policy, lcfg)
        self.state.step += 1
        if lcfg.reference_refresh_every and self.state.step % lcfg.reference_refresh_every == 0:
            policy.reference.load_state_dict(policy.model.state_dict())
        totals = sum_over_ranks(sums, dist)
        seconds = time.perf_counter() - started
        self.gauges.update({
            "loss": totals["loss"] / max(totals["weight"], 1e-9), "grad_norm": grad_norm,
            "lr": policy.scheduler.get_last_lr()[0], "step_seconds": seconds,
            "step_tokens_per_s": totals["tokens"] / max(seconds, 1e-9),
            "policy_lag": batch.counters["policy_lag_sum"] / len(batch.examples),
            **{name: totals[name] / totals["pairs"] for name in sorted(totals)
               if name not in ("loss", "weight", "pairs", "tokens")},
        })
        self.counters["pairs_trained"] += len(batch.examples)
        self.counters["tokens_trained"] += totals["tokens"]
        self.counters["steps"] += 1
        self.interval_tokens += totals["tokens"]
        self.log.debug("step", step=self.state.step, loss=self.gauges["loss"], pairs=len(batch.examples),
                       policy_version=self.state.version)

    def account(self, batch: StepInput) -> None:
        """The step's records are accounted only now: trained ones enter the dedupe window, every record
        looked at (trained or dropped) moves the resume position and is logged, drops are counted."""
        for item_id in batch.item_ids:
            self.seen.first_time(item_id)
        self.state.positions.update(batch.positions)
        if self.record is not None:
            self.record.batch(self.state.step, batch.records, batch.trained)
        self.counters.update({k: v for k, v in batch.counters.items() if k != "policy_lag_sum"})

    # ----------------------------------------------------------------------- publish and checkpoint

    def publish(self) -> None:
        """Weight store first, then the announcement on sip.weights (rollout workers hot-reload)."""
        import torch

        assert self.reader is not None and self.store is not None
        started = time.perf_counter()
        tensors = unique_state_dict(self.policy.model, getattr(torch, self.lcfg.publish_dtype))
        publication = self.store.publish(tensors, self.state.version + 1, self.state.step,
                                         {"run_name": self.cfg.run_name, "algo": self.lcfg.algo,
                                          "config_hash": self.config_hash})
        self.reader.produce(T.WEIGHTS, weights_announcement(
            run_name=self.cfg.run_name, version=publication.version, uri=publication.uri, sha256=publication.sha256,
            step=publication.step, created_at=publication.created_at, algo=self.lcfg.algo))
        self.reader.flush("weight announcement")  # sync point: the version counts only once announced
        self.state.version, self.state.published_step = publication.version, self.state.step
        if self.record is not None:
            self.record.published(publication.version, publication.step, publication.sha256, publication.uri)
        self.counters["published"] += 1
        self.metrics.observe("sipstream_weights_publish_duration_seconds", time.perf_counter() - started)
        self.log.info("weights published", policy_version=self.state.version, step=self.state.step, uri=publication.uri)

    def checkpoint(self) -> None:
        """Model, optimizer, scheduler, RNG, offsets, dedupe window; then the manifest."""
        policy, state = self.policy, self.state
        state.seen_ids = list(self.seen._ids)
        state.counters = dict(self.counters)
        refreshed = self.lcfg.reference_refresh_every is not None and policy.reference is not None
        if self.record is not None:
            self.record.before_checkpoint(state)  # the log lines this checkpoint covers are on disk first
        path = save_checkpoint(
            self.checkpoint_dir, state, unique_state_dict(policy.model),
            {"optimizer": policy.optimizer.state_dict(), "scheduler": policy.scheduler.state_dict()},
            unique_state_dict(policy.reference) if refreshed else None, keep=self.lcfg.keep_checkpoints,
        )
        self.log.info("checkpoint written", path=str(path), step=state.step, policy_version=state.version)
        self.write_manifest("running")

    def write_manifest(self, status: str) -> None:
        if self.record is not None and self.reader is not None:
            self.record.write(self.state, dict(self.counters), status, self.reader.topic, self.reader.produced,
                              self.cfg.bus)

    # ----------------------------------------------------------------------- telemetry

    def observe_metrics(self) -> None:
        """/metrics from the loop's own counters and gauges (after each step; cheap)."""
        metrics, counters = self.metrics, self.counters
        for name, key in (("sipstream_learner_steps_total", "steps"), ("sipstream_learner_tokens_total", "tokens_trained"),
                          ("sipstream_learner_pairs_trained_total", "pairs_trained"),
                          ("sipstream_weights_published_total", "published")):
            metrics.sync_total(name, counters[key])
        if self.reader is not None:
            metrics.sync_total("sipstream_records_consumed_total", counters["consumed"], topic=self.reader.topic)
            for error, n in self.reader.deadlettered.items():
                metrics.sync_total("sipstream_records_deadlettered_total", n, topic=self.reader.topic, error=error)
        metrics.set("sipstream_policy_version", self.state.version)
        metrics.set("sipstream_learner_loss", self.gauges.get("loss"))
        metrics.set("sipstream_learner_reward_margin", self.gauges.get("reward_margin"))
        metrics.set("sipstream_learner_tokens_per_second", self.gauges.get("tokens_per_s"))

    def publish_metrics(self, force: bool = False) -> None:
        """A sip.metrics record every `runner.metrics_interval_s` (rank 0)."""
        elapsed = time.monotonic() - self.last_metrics
        if self.reader is None or (not force and elapsed < self.cfg.runner.metrics_interval_s):
            return
        self.gauges["tokens_per_s"] = self.interval_tokens / max(elapsed, 1e-9)
        self.reader.produce(T.METRICS, {
            "source": "learner", "instance": self.instance_id, "ts": time.time(),
            "interval_s": self.cfg.runner.metrics_interval_s,
            "counters": {k: float(v) for k, v in sorted(self.counters.items())},
            "gauges": {**self.gauges, "policy_version": self.state.version, "step": self.state.step}})
        self.reader.producer.poll(0)
        self.interval_tokens, self.last_metrics = 0.0, time.monotonic()

    # ----------------------------------------------------------------------- the loop

    def run(self) -> LearnerState:
        """Train until `max_steps`, the idle timeout or a stop request; returns the final state."""
        lcfg, state = self.lcfg, self.state
        self.observe_metrics()
        self.log.info("learner started", step=state.step, policy_version=state.version,
                      world_size=self.dist.world_size, weight_store=self.weight_root,
                      checkpoint_dir=str(self.checkpoint_dir))
        clean_exit = False
        try:
            self.write_manifest("running")
            while lcfg.max_steps is None or state.step < lcfg.max_steps:
                # --- consume: the step's pairs (short of a full step on a stop request or the idle timeout) ---
                batch = self.consume()
                if batch.examples:
                    # --- loss and step: forward + backward per micro-batch; clip, AdamW, schedule ---
                    self.train(batch)
                self.account(batch)
                if self.reader is not None and batch.examples:
                    # --- publish: weight store first, then the announcement ---
                    if state.step % lcfg.sync_every == 0:
                        self.publish()
                    # --- checkpoint: model, optimizer, scheduler, RNG, offsets, dedupe window ---
                    if state.step % lcfg.checkpoint_every == 0:
                        self.checkpoint()
                        # --- commit: only offsets a checkpoint covers ---
                        self.reader.commit(state.positions)
                self.publish_metrics()
                self.observe_metrics()
                self.health.beat()
                if batch.end is not None:
                    self.log.info("stop requested; stopping" if batch.end == "stop" else
                                  "no pairs for idle_timeout_s; stopping", idle_timeout_s=lcfg.idle_timeout_s,
                                  policy_version=state.version)
                    break
            clean_exit = True
        finally:
            self.close(clean_exit)
        self.log.info("learner stopped", step=state.step, policy_version=state.version,
                      **{k: v for k, v in self.counters.items() if not k.endswith("_sum")})
        state.counters = dict(self.counters)
        return state

    def close(self, clean_exit: bool) -> None:
        """A graceful stop leaves nothing behind: latest weights published, state checkpointed, offsets
        committed, the manifest finished. Whatever happened, the servers and clients are closed."""
        try:
            if clean_exit and self.reader is not None:
                if self.state.step > self.state.published_step:
                    self.publish()
                self.checkpoint()
                self.reader.commit(self.state.positions)
                self.publish_metrics(force=True)
                self.reader.flush("final metrics")  # their offsets belong in the manifest
                self.write_manifest("finished")
        finally:
            self.health.close()
            if self.record is not None:
                self.record.close()
            if self.reader is not None:
                self.reader.close()
            shutdown(self.dist)


def run_learner(
    cfg: Any,
    bootstrap: str,
    *,
    learner: LearnerConfig | None = None,
    instance_id: str | None = None,
    handle_signals: bool = True,
    pair_reader: Callable[..., PairReader] | None = None,
    expect_initial_sha256: str | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> LearnerState:
    """Train the policy from `sip.pairs` until `max_steps`, idle timeout or SIGTERM/SIGINT.

    `cfg` is the full `sipstream.config.Config` (run_name, run_dir, seed, bus, runner, models.policy);
    `learner` overrides `cfg.learner`. Returns the final state (step, version, counters).

    Replay hooks (`sipstream.replay.run`): `pair_reader` builds the reader instead of `PairReader` (same
    arguments); `expect_initial_sha256` refuses to train from other initial weights than the recorded
    run's; `manifest_extra` is merged into this run's manifest.
    """
    lcfg = resolve_learner_config(cfg, learner)
    dist = init_distributed(resolve_device(lcfg), lcfg.dist_timeout_s)
    learner_run = Learner(cfg, lcfg, bootstrap, dist, instance_id=instance_id, pair_reader=pair_reader,
                          expect_initial_sha256=expect_initial_sha256, manifest_extra=manifest_extra)
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, learner_run.request_stop)
    return learner_run.run()
