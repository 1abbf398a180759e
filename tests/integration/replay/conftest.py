"""Replay fixtures: one short learner run on the real embedded broker, shared by the module's tests."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from sipstream.bus import topics as T
from sipstream.config import load_config, merged


def make_pair(i: int, *, tag: str = "p", tie: bool = False, total: float = 2.0) -> dict:
    good, bad = f" the river ran quietly past house {i}.", " zebra zebra zebra!!"
    def candidate(text, score):
        return {"kind": "rollout", "index": 0, "text": text, "total": score}
    return {"item_id": f"{tag}{i}:1", "doc_id": f"{tag}{i}", "prefix": f"Chapter {i}. In the morning",
            "suffix": good, "seed": i, "policy_version": 0,
            "chosen": None if tie else candidate(good, total), "rejected": None if tie else candidate(bad, 0.5),
            "target": candidate(good, total)}


def replay_cfg(bootstrap: str, root, model_cache, prefix: str | None = None):
    """A config on its own topic prefix with the tiny GPT-2 policy and a small, fast learner."""
    prefix = prefix or f"r{uuid.uuid4().hex[:8]}."
    cfg = load_config(overrides=[f"bus.bootstrap_servers={bootstrap}", f"bus.topic_prefix={prefix}",
                                 f"bus.group_prefix={prefix}group", "runner.metrics_interval_s=1"], env={})
    return merged(cfg, run_name="orig", run_dir=str(root / "runs"),
                  models={"policy": {"source": "tiny-gpt2", "cache_dir": str(model_cache), "device": "cpu",
                                     "max_prompt_tokens": 64}},
                  learner={"algo": "dpo", "device": "cpu", "lr": 1e-3, "batch_pairs": 2, "max_policy_lag": 100,
                           "sync_every": 2, "checkpoint_every": 2, "poll_timeout_s": 0.2, "idle_timeout_s": 1.5})


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def original(broker, model_cache, tmp_path_factory):
    """A finished DPO run over pairs spread on 4 partitions, with a duplicate, a tie and a bad record."""
    import json

    from confluent_kafka import Producer

    from sipstream.learner.loop import run_learner

    root = tmp_path_factory.mktemp("replay")
    cfg = replay_cfg(broker.bootstrap_servers, root, model_cache)
    T.create_topics(cfg.bus, broker.bootstrap_servers, T.load_specs())
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    records = [make_pair(i) for i in range(9)] + [make_pair(3), make_pair(50, tie=True), b"{not json"]
    for value in records:
        key = value["doc_id"].encode() if isinstance(value, dict) else b"junk"
        producer.produce(cfg.bus.topic(T.PAIRS), value=value if isinstance(value, bytes) else json.dumps(value).encode(),
                         key=key)
    assert producer.flush(30) == 0
    state = run_learner(cfg, broker.bootstrap_servers, handle_signals=False)
    assert state.counters["pairs_trained"] == 9 and state.step == 5
    return cfg, root / "runs" / "orig"
