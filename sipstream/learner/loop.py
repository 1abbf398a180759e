"""The learner: one loop, top to bottom, in phases.

    consume (a step's pairs from sip.pairs) → loss (forward, backward per micro-batch) → step (clip,
    AdamW, schedule) → publish (every `sync_every` steps: weight store, then sip.weights) →
    checkpoint (every `checkpoint_every` steps) → commit (the offsets that checkpoint covers)

Delivery guarantee: **every pair is trained exactly once within a run**, across crashes. The
learner does not rely on the group's committed offsets to resume: it `assign()`s every partition of
`sip.pairs` at the offsets stored in its latest checkpoint together with the model, optimizer,
scheduler, RNG states and the dedupe window, so after `kill -9` it re-reads exactly the records that
came after the state it restored. Offsets are committed to the group only after the checkpoint that
covers them (for monitoring, and as the start of a run without a checkpoint). Duplicate items from
upstream at-least-once delivery are skipped by `item_id`.

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

import contextlib
import copy
import json
import math
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from sipstream.bus import topics as T
from sipstream.bus.client import consumer_config, producer_config, usable_messages
from sipstream.bus.deadletter import deadletter_from_message
from sipstream.bus.dedupe import SeenIds
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
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    shutdown,
    wrap_model,
)
from sipstream.learner.losses import ALGOS, Algo, LossInputs
from sipstream.learner.record import RunRecord
from sipstream.learner.sequences import (
    Example,
    continuation_texts,
    encode_example,
    sequence_logps,
    split_by_tokens,
)
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

SINGLE_PROCESS = DistInfo()

# --------------------------------------------------------------------------- the policy and its optimizer


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of `lr` for optimizer step `step` (0-based): linear warm-up, then cosine to the floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.total_steps is None:
        return 1.0
    if step >= cfg.total_steps:
        return cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr_ratio)


@dataclass
class Policy:
    """The trained model with what trains it."""

    tokenizer: Any
    """The `HFModel` wrapper: tokenization identical to the rollout workers'."""
    model: Any
    """The trained module (unwrapped; what is published and checkpointed)."""
    train_model: Any
    """`model`, or its DDP wrapper under torchrun."""
    reference: Any | None
    optimizer: Any
    scheduler: Any
    device: Any
    bf16: bool
    max_seq_tokens: int

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def resolve_device(cfg: LearnerConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("learner.device is 'cuda' but no GPU is visible; set learner.device=auto or cpu")
    return cfg.device


def enable_gradient_checkpointing(model: Any) -> None:
    """transformers recomputes layers only in training mode, so switch to it with every dropout set to
    zero: the forward pass stays the deterministic eval-mode one (policy and reference comparable)."""
    import torch

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def build_policy(policy_spec: Any, cfg: LearnerConfig, dist: DistInfo = SINGLE_PROCESS) -> Policy:
    """Load the policy (float32 master weights), a frozen copy as DPO reference, AdamW and its schedule."""

    import torch

    from sipstream.models.hf import HFModel

    device_type = resolve_device(cfg)
    device = torch.device(f"cuda:{dist.local_rank}" if device_type == "cuda" else "cpu")
    max_seq_tokens = cfg.max_seq_tokens or policy_spec.max_prompt_tokens
    # Whatever backend serves rollouts, the learner trains the transformers model of the same source.
    spec = policy_spec.model_copy(update={"backend": "hf", "device": device_type, "dtype": "float32",
                                          "max_prompt_tokens": max_seq_tokens})
    hf = HFModel(spec)
    model = hf.model.to(device)
    # Dropout off (TRL's disable_dropout default): policy and reference log-probs are then comparable,
    # and a step is a deterministic function of its batch.
    model.eval()
    model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = None
    if ALGOS[cfg.algo].needs_reference:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    # fused: one pass over each parameter tensor per step. torch's default on CPU makes about eight
    # elementwise passes over all the weights with full-size temporaries (benchmarks/results/learner_vs_bare.md).
    # A checkpoint keeps the flag: runs resumed from older checkpoints continue unfused, bit for bit.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  fused=device_type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and device_type == "cuda")
    return Policy(hf, model, wrap_model(model, dist, device_type), reference, optimizer, scheduler, device, bf16,
                  max_seq_tokens)


# --------------------------------------------------------------------------- loss and step


def step_weight(algo: Algo, examples: list[Example]) -> float:
    """What a step's loss is averaged over, known before any forward pass: pairs (DPO) or target tokens."""
    if algo.name == "dpo":
        return float(len(examples))
    return float(sum(max(e.continuation_lengths[0], 0) for e in examples)) or 1.0


def micro_batches(examples: list[Example], cfg: LearnerConfig) -> list[list[Example]]:
    """`batch_pairs` pairs per pass, split further where a pass would exceed `batch_tokens`."""
    passes: list[list[Example]] = []
    for start in range(0, len(examples), cfg.batch_pairs):
        passes.extend(split_by_tokens(examples[start:start + cfg.batch_pairs], cfg.batch_tokens))
    return passes


def accumulate_gradients(
    policy: Policy, algo: Algo, cfg: LearnerConfig, examples: list[Example], weight: float, dist: DistInfo = SINGLE_PROCESS
) -> dict[str, float]:
    """Forward and backward every micro-batch of this rank's share of the step; returns metric sums."""
    import torch

    pad_id = policy.tokenizer.pad_token_id
    passes = micro_batches(examples, cfg)
    # DDP averages gradients over ranks; scaling by world_size / global weight makes that average the
    # single-process mean loss of the whole step.
    scale = dist.world_size / weight
    sums: dict[str, Any] = {}
    for index, group in enumerate(passes):
        # Under DDP only the step's last backward all-reduces gradients.
        last = index == len(passes) - 1
        sync = contextlib.nullcontext() if last or not dist.enabled else policy.train_model.no_sync()
        with sync:
            with policy.autocast():
                logps, lengths = sequence_logps(policy.train_model, group, pad_id, policy.device)  # (B, R)
                ref_logps = None
                if algo.needs_reference:
                    with torch.no_grad():
                        ref_logps, _ = sequence_logps(policy.reference, group, pad_id, policy.device)
            out = algo.loss(LossInputs(logps, lengths, ref_logps), cfg)
            (out.losses.sum() * scale).backward()
        for name, value in {"loss": out.losses.detach(), "weight": out.weights, **out.metrics}.items():
            sums[name] = sums.get(name, 0.0) + value.sum()
        sums["pairs"] = sums.get("pairs", 0) + len(group)
        sums["tokens"] = sums.get("tokens", 0) + sum(e.tokens for e in group)
    if not passes and dist.enabled:
        # A rank with no share (a short final step) must still join the gradient all-reduce.
        (sum(p.sum() for p in policy.model.parameters()) * 0.0).backward()
    # .item() is a sync point on GPU: once per step, not per micro-batch.
    return {name: float(value) for name, value in sums.items()}


def optimizer_step(policy: Policy, cfg: LearnerConfig) -> float:
    """Clip, update, advance the schedule; returns the gradient norm before clipping."""
    import torch

    params = [p for p in policy.model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    policy.optimizer.step()
    policy.scheduler.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


# --------------------------------------------------------------------------- consume


@dataclass
class StepInput:
    """The pairs of one optimizer step and the records accounted for while collecting them."""

    examples: list[Example] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    """Next offset per partition after every record looked at (trained or skipped)."""
    counters: Counter[str] = field(default_factory=Counter)
    item_ids: list[str] = field(default_factory=list)
    records: list[tuple[int, int]] = field(default_factory=list)
    """(partition, offset) of every record looked at, in delivery order (the consumption log's line)."""
    trained: list[int] = field(default_factory=list)
    """Indices into `records` of the records that became examples."""
    end: str | None = None
    """Why collection ended early: `stop` (SIGTERM; the step is discarded) or `idle`."""


def decode_pair(raw: bytes | None, spec: T.TopicSpec) -> dict[str, Any] | tuple[str, str]:
    """The pair, or (error class, reason) for sip.deadletter."""
    if raw is None:
        return ("bad_json", "empty value (tombstone)")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return ("bad_encoding", f"value is not UTF-8: {exc}")
    except json.JSONDecodeError as exc:
        return ("bad_json", f"value is not JSON: {exc}")
    errors = spec.errors(value)
    if errors:
        return ("schema", f"violates {spec.name} schema: " + "; ".join(errors[:5]))
    return value


class PairReader:
    """Rank 0's side of the bus: the sip.pairs consumer, the producer, dead letters and commits."""

    def __init__(self, cfg: Any, bootstrap: str, positions: dict[int, int], instance_id: str, log: Any) -> None:


        self.cfg = cfg
        self.log = log
        self.instance_id = instance_id
        self.specs = T.load_specs(T.topics_dir(cfg.bus))
        self.topic = cfg.bus.topic(T.PAIRS)
        self.delivery_errors: list[str] = []
        self.produced: dict[str, dict[int, list[int]]] = {}
        """{live topic: {partition: [first, last + 1]}} of the acknowledged records (for the manifest)."""
        self.producer = Producer(producer_config(cfg.bus, bootstrap, client_id=instance_id))
        self.consumer = Consumer(
            consumer_config(cfg.bus, bootstrap, group_id=f"{cfg.bus.group_prefix}.learner", client_id=instance_id)
        )
        metadata = self.consumer.list_topics(self.topic, timeout=30).topics.get(self.topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            self.consumer.close()
            raise UserError(f"topic {self.topic} does not exist; run `sipstream topics create` first")
        partitions = sorted(metadata.partitions)
        if positions:
            start = {p: positions.get(p, OFFSET_BEGINNING) for p in partitions}
        else:
            # No checkpoint: a fresh run starts where the group left off, else at the beginning.
            committed = self.consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=30)
            start = {tp.partition: tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed}
        # assign(), not subscribe(): the checkpoint, not the group, decides where reading resumes, and
        # there is no group join to wait for (docs/embedded-broker.md: several seconds on the embedded broker).
        self.consumer.assign([TopicPartition(self.topic, p, start[p]) for p in partitions])
        self.committed: dict[int, int] = {}
        self.deadlettered: Counter[str] = Counter()
        """Dead letters by failure class (for /metrics)."""

    def consume(self, count: int, timeout: float) -> list[Any]:
        """Up to `count` records (never more, so nothing is read ahead of the step that needs it)."""

        messages = self.consumer.consume(num_messages=count, timeout=timeout)
        self.producer.poll(0)  # serve delivery callbacks
        return usable_messages(messages, self.topic, self.log)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.delivery_errors.append(f"{msg.topic()}: {err.str()}")
            return
        span = self.produced.setdefault(msg.topic(), {}).setdefault(msg.partition(), [msg.offset(), msg.offset() + 1])
        span[0], span[1] = min(span[0], msg.offset()), max(span[1], msg.offset() + 1)

    def produce(self, topic: str, value: dict[str, Any]) -> None:
        spec = self.specs[topic]
        errors = spec.errors(value)
        if errors:  # our own record: a bug, not a data problem
            raise ValueError(f"learner produced an invalid {topic} record: {errors[:3]}")
        key = value.get(spec.key)
        self.producer.produce(self.cfg.bus.topic(topic), value=T.encode_value(value),
                              key=None if key is None else str(key).encode("utf-8"), on_delivery=self._on_delivery)

    def flush(self, what: str) -> None:
        """Wait for every acknowledgement (a sync point); a lost record is an error, never ignored."""
        remaining = self.producer.flush(30.0)
        if remaining or self.delivery_errors:
            errors, self.delivery_errors = self.delivery_errors, []
            raise RuntimeError(f"{what}: {remaining} record(s) unacknowledged, failures: {errors[:3]}")

    def deadletter(self, msg: Any, error: str, reason: str) -> None:

        self.produce(T.DEADLETTER, deadletter_from_message(msg, stage="learner", instance=self.instance_id, error=error,
                                                           reason=reason, limit=self.cfg.runner.deadletter_max_value_bytes))
        self.deadlettered[error] += 1
        self.log.warning("record dead-lettered", error=error, reason=reason[:300], topic=msg.topic(),
                         partition=msg.partition(), offset=msg.offset())

    def commit(self, positions: dict[int, int]) -> None:
        """Commit the offsets a checkpoint covers (a synchronous round trip to the broker)."""

        todo = {p: o for p, o in positions.items() if self.committed.get(p) != o}
        if not todo:
            return  # committing nothing new raises _NO_OFFSET (docs/embedded-broker.md)
        self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(todo.items())],
                             asynchronous=False)
        self.committed.update(todo)

    def close(self) -> None:
        try:
            self.producer.flush(10.0)
        finally:
            self.consumer.close()


def consume_step(
    reader: PairReader, state: LearnerState, seen: SeenIds, algo: Algo, cfg: LearnerConfig, tokenizer: Any,
    max_seq_tokens: int, stopping: Callable[[], bool],
) -> StepInput:
    """Collect one step's pairs: skip and count duplicates, pairs the algorithm cannot use and stale
    pairs; dead-letter invalid records. Nothing here changes `state`: the caller accounts the step."""
    want = cfg.batch_pairs * cfg.grad_accum
    batch = StepInput()
    spec = reader.specs[T.PAIRS]
    idle_since = time.monotonic()
    while len(batch.examples) < want:
        if stopping():
            batch.end = "stop"
            return batch
        records = reader.consume(want - len(batch.examples), cfg.poll_timeout_s)
        if not records:
            if cfg.idle_timeout_s is not None and time.monotonic() - idle_since >= cfg.idle_timeout_s:
                batch.end = "idle"
                return batch
            continue
        idle_since = time.monotonic()
        for msg in records:
            batch.positions[msg.partition()] = msg.offset() + 1
            batch.records.append((msg.partition(), msg.offset()))
            batch.counters["consumed"] += 1
            pair = decode_pair(msg.value(), spec)
            if isinstance(pair, tuple):
                reader.deadletter(msg, *pair)
                batch.counters["deadlettered"] += 1
                continue
            if pair["item_id"] in seen or pair["item_id"] in batch.item_ids:
                batch.counters["skipped_duplicate"] += 1
                continue
            texts = continuation_texts(pair, algo.continuations)
            if texts is None:  # dpo: an exact tie (no chosen/rejected); nll: nothing passed the threshold
                batch.counters[f"skipped_no_{algo.continuations[-1] if algo.name == 'dpo' else algo.continuations[0]}"] += 1
                continue
            lag = state.version - pair["policy_version"]
            if algo.name != "pretrain" and lag > cfg.max_policy_lag:  # the original suffix never goes stale
                batch.counters["stale"] += 1
                if cfg.stale_pairs == "drop":
                    batch.counters["dropped_stale"] += 1
                    continue
            example = encode_example(tokenizer, pair, texts, max_seq_tokens)
            if algo.name != "dpo" and example.continuation_lengths[0] == 0:
                batch.counters["skipped_empty"] += 1
                continue
            batch.counters["policy_lag_sum"] += max(lag, 0)
            batch.trained.append(len(batch.records) - 1)
            batch.item_ids.append(pair["item_id"])
            batch.examples.append(example)
    return batch


# --------------------------------------------------------------------------- the loop


def resolve_learner_config(cfg: Any, learner: LearnerConfig | None) -> LearnerConfig:
    """`learner` if given, else `cfg.learner` (validated as this module's LearnerConfig)."""
    if learner is not None:
        return learner
    if isinstance(cfg.learner, LearnerConfig):
        return cfg.learner
    return LearnerConfig.model_validate(cfg.learner.model_dump())


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
    import torch


    lcfg = resolve_learner_config(cfg, learner)
    algo = ALGOS[lcfg.algo]
    dist = init_distributed(resolve_device(lcfg))
    instance_id = instance_id or f"learner-{socket.gethostname()}-{os.getpid()}"
    log = get_logger(stage="learner", instance=instance_id, rank=dist.rank, algo=lcfg.algo)
    run_dir = Path(cfg.run_dir) / cfg.run_name
    checkpoint_dir = lcfg.checkpoint_dir or run_dir / "learner"
    weight_root = lcfg.weight_store or (run_dir / "weights").resolve().as_uri()
    this_config = config_hash({"learner": lcfg.model_dump(mode="json"), "seed": cfg.seed,
                               "policy": cfg.models.policy.model_dump(mode="json")})

    metrics = ProcessMetrics("learner", run=cfg.run_name, stage="learner")
    # --- set up: policy, reference, optimizer; then the latest checkpoint, if any ---
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    load_started = time.perf_counter()
    policy = build_policy(cfg.models.policy, lcfg, dist)
    metrics.set("sipstream_model_load_seconds", time.perf_counter() - load_started)
    # The initial weights' hash, before any checkpoint is restored: what a replay must start from.
    initial_sha256 = tensors_sha256(unique_state_dict(policy.model)) if dist.is_main else ""
    if expect_initial_sha256 is not None and initial_sha256 != expect_initial_sha256:
        raise UserError(f"models.policy.source {cfg.models.policy.source!r} now builds initial weights with sha256 "
                        f"{initial_sha256[:12]}…, the recorded run started from {expect_initial_sha256[:12]}…; "
                        "point models.policy.source at the original checkpoint (--set models.policy.source=...)")
    state = LearnerState(config_hash=this_config)
    checkpoint = load_latest(checkpoint_dir)
    if checkpoint is not None:
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
    seen = SeenIds(lcfg.dedupe_capacity)
    for item_id in state.seen_ids:
        seen.first_time(item_id)
    counters: Counter[str] = Counter(state.counters)

    reader = (pair_reader or PairReader)(cfg, bootstrap, state.positions, instance_id, log) if dist.is_main else None
    store = WeightStore(weight_root, cfg.run_name, lcfg.weight_store_options) if dist.is_main else None
    # The consumption log and manifest (rank 0): which records every step trained on, for replay.
    record = RunRecord(run_dir, cfg, lcfg, bootstrap, state, initial_sha256=initial_sha256,
                       tokenizer_sha256=tokenizer_sha256(policy.tokenizer.tokenizer),
                       extra=manifest_extra) if reader is not None else None

    def write_manifest(status: str) -> None:
        if record is not None and reader is not None:
            record.write(state, dict(counters), status, reader.topic, reader.produced, cfg.bus)

    stop_requested = False

    def request_stop(*_: Any) -> None:  # only sets a flag: the step in hand finishes first
        nonlocal stop_requested
        stop_requested = True

    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def publish() -> None:
        assert reader is not None and store is not None
        publish_started = time.perf_counter()
        tensors = unique_state_dict(policy.model, getattr(torch, lcfg.publish_dtype))
        publication = store.publish(tensors, state.version + 1, state.step,
                                    {"run_name": cfg.run_name, "algo": lcfg.algo, "config_hash": this_config})
        reader.produce(T.WEIGHTS, {"run_name": cfg.run_name, "version": publication.version, "uri": publication.uri,
                                   "sha256": publication.sha256, "step": publication.step,
                                   "created_at": publication.created_at, "algo": lcfg.algo})
        reader.flush("weight announcement")  # sync point: the version counts only once announced
        state.version, state.published_step = publication.version, state.step
        if record is not None:
            record.published(publication.version, publication.step, publication.sha256, publication.uri)
        counters["published"] += 1
        metrics.observe("sipstream_weights_publish_duration_seconds", time.perf_counter() - publish_started)
        log.info("weights published", policy_version=state.version, step=state.step, uri=publication.uri)

    def checkpoint_now() -> None:
        state.seen_ids = list(seen._ids)
        state.counters = dict(counters)
        refreshed = lcfg.reference_refresh_every is not None and policy.reference is not None
        if record is not None:
            record.before_checkpoint(state)  # the log lines this checkpoint covers are on disk first
        path = save_checkpoint(
            checkpoint_dir, state, unique_state_dict(policy.model),
            {"optimizer": policy.optimizer.state_dict(), "scheduler": policy.scheduler.state_dict()},
            unique_state_dict(policy.reference) if refreshed else None, keep=lcfg.keep_checkpoints,
        )
        log.info("checkpoint written", path=str(path), step=state.step, policy_version=state.version)
        write_manifest("running")

    gauges: dict[str, float | None] = {}
    interval_tokens, last_metrics = 0.0, time.monotonic()

    def observe_metrics() -> None:
        """/metrics from the loop's own counters and gauges (after each step; cheap)."""
        for name, key in (("sipstream_learner_steps_total", "steps"), ("sipstream_learner_tokens_total", "tokens_trained"),
                          ("sipstream_learner_pairs_trained_total", "pairs_trained"),
                          ("sipstream_weights_published_total", "published")):
            metrics.sync_total(name, counters[key])
        if reader is not None:
            metrics.sync_total("sipstream_records_consumed_total", counters["consumed"], topic=reader.topic)
            for error, n in reader.deadlettered.items():
                metrics.sync_total("sipstream_records_deadlettered_total", n, topic=reader.topic, error=error)
        metrics.set("sipstream_policy_version", state.version)
        metrics.set("sipstream_learner_loss", gauges.get("loss"))
        metrics.set("sipstream_learner_reward_margin", gauges.get("reward_margin"))
        metrics.set("sipstream_learner_tokens_per_second", gauges.get("tokens_per_s"))

    def stopping() -> bool:
        health.beat()  # called on every poll, also while waiting for pairs: the loop is alive
        return stop_requested

    def publish_metrics(force: bool = False) -> None:
        nonlocal interval_tokens, last_metrics
        elapsed = time.monotonic() - last_metrics
        if reader is None or (not force and elapsed < cfg.runner.metrics_interval_s):
            return
        gauges["tokens_per_s"] = interval_tokens / max(elapsed, 1e-9)
        reader.produce(T.METRICS, {"source": "learner", "instance": instance_id, "ts": time.time(),
                                   "interval_s": cfg.runner.metrics_interval_s,
                                   "counters": {k: float(v) for k, v in sorted(counters.items())},
                                   "gauges": {**gauges, "policy_version": state.version, "step": state.step}})
        reader.producer.poll(0)
        interval_tokens, last_metrics = 0.0, time.monotonic()

    # /livez, /readyz, /metrics on rank 0 only (one port per machine). Started once set-up succeeded, so
    # a failed start leaves no server behind; a Kubernetes startupProbe covers the model load.
    health = start_health_server(cfg.runner.health_port if dist.is_main else None, cfg.runner.health_host,
                                 metrics=metrics.text, stale_after_s=cfg.runner.health_stale_after_s)
    observe_metrics()
    log.info("learner started", step=state.step, policy_version=state.version, world_size=dist.world_size,
             weight_store=weight_root, checkpoint_dir=str(checkpoint_dir))
    clean_exit = False
    try:
        write_manifest("running")
        while lcfg.max_steps is None or state.step < lcfg.max_steps:
            # --- consume: rank 0 reads the step's pairs; every rank gets them (sync point under DDP) ---
            batch = None
            if reader is not None:
                batch = consume_step(reader, state, seen, algo, lcfg, policy.tokenizer, policy.max_seq_tokens,
                                     stopping)
            batch = broadcast_object(batch, dist)
            if batch.end == "stop":
                break  # a partial step is not trained and not accounted: it is re-read after a restart
            started = time.perf_counter()

            if batch.examples:
                # --- loss: forward + backward of every micro-batch; the loss is the mean over the step ---
                sums = accumulate_gradients(policy, algo, lcfg, batch.examples[dist.rank::dist.world_size],
                                            step_weight(algo, batch.examples), dist)
                # --- step: clip, AdamW, schedule ---
                grad_norm = optimizer_step(policy, lcfg)
                state.step += 1
                if lcfg.reference_refresh_every and state.step % lcfg.reference_refresh_every == 0:
                    policy.reference.load_state_dict(policy.model.state_dict())
                names = sorted(sums)
                totals = dict(zip(names, all_reduce_sum([sums[n] for n in names], dist, policy.device), strict=True))
                seconds = time.perf_counter() - started
                gauges.update({
                    "loss": totals["loss"] / max(totals["weight"], 1e-9), "grad_norm": grad_norm,
                    "lr": policy.scheduler.get_last_lr()[0], "step_seconds": seconds,
                    "step_tokens_per_s": totals["tokens"] / max(seconds, 1e-9),
                    "policy_lag": batch.counters["policy_lag_sum"] / len(batch.examples),
                    **{name: totals[name] / totals["pairs"] for name in names
                       if name not in ("loss", "weight", "pairs", "tokens")},
                })
                counters["pairs_trained"] += len(batch.examples)
                counters["tokens_trained"] += totals["tokens"]
                counters["steps"] += 1
                interval_tokens += totals["tokens"]
                log.debug("step", step=state.step, loss=gauges["loss"], pairs=len(batch.examples),
                          policy_version=state.version)
            # The step's records are accounted only now: trained ones enter the dedupe window, and
            # every record looked at (trained or skipped) moves the resume position.
            for item_id in batch.item_ids:
                seen.first_time(item_id)
            state.positions.update(batch.positions)
            if record is not None:
                record.batch(state.step, batch.records, batch.trained)
            counters.update({k: v for k, v in batch.counters.items() if k != "policy_lag_sum"})

            if reader is not None and batch.examples:
                # --- publish: weight store first, then the announcement (rollout workers hot-reload) ---
                if state.step % lcfg.sync_every == 0:
                    publish()
                # --- checkpoint: model, optimizer, scheduler, RNG, offsets, dedupe window ---
                if state.step % lcfg.checkpoint_every == 0:
                    checkpoint_now()
                    # --- commit: only offsets a checkpoint covers ---
                    reader.commit(state.positions)
            publish_metrics()
            observe_metrics()
            health.beat()
            if batch.end == "idle":
                log.info("no pairs for idle_timeout_s; stopping", idle_timeout_s=lcfg.idle_timeout_s,
                         policy_version=state.version)
                break
        clean_exit = True
    finally:
        try:
            if clean_exit and reader is not None:
                # A graceful stop leaves nothing behind: latest weights published, state checkpointed.
                if state.step > state.published_step:
                    publish()
                checkpoint_now()
                reader.commit(state.positions)
                publish_metrics(force=True)
                reader.flush("final metrics")  # their offsets belong in the manifest
                write_manifest("finished")
        finally:
            health.close()
            if record is not None:
                record.close()
            if reader is not None:
                reader.close()
            shutdown(dist)
    log.info("learner stopped", step=state.step, policy_version=state.version,
             **{k: v for k, v in counters.items() if not k.endswith("_sum")})
    state.counters = dict(counters)
    return state

