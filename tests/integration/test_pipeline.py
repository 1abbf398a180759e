"""The whole pipeline on the real broker with tiny models: every topic checked against its schema and
against the topics before it; two rollout workers in one group share the work."""

from __future__ import annotations

import threading

import pytest

from sipstream.bus import topics as T
from sipstream.bus.runner import StageRunner
from sipstream.config import merged
from sipstream.data import load_corpus
from sipstream.ops.ingest import produce_documents
from sipstream.ops.manifest import pipeline_manifest
from sipstream.replay.run import replay_stage
from sipstream.stages import build_stage

TINY = {"policy": {"source": "tiny-gpt2"}, "judge": {"source": "tiny-gpt2"}, "rewriter": {"source": "tiny-gpt2"}}


@pytest.fixture
def tiny_cfg(bus):
    return merged(bus.cfg, models=TINY, items={"suffix_tokens": 12, "min_suffix_tokens": 4, "max_items_per_document": 2,
                                                "min_prefix_tokens": 1},
                  rollout={"rollouts": 2}, rewriter={"rewrite_candidates": 2, "only_rewrite_unsafe": False})


def run_stage(name: str, cfg, bootstrap: str, expect: int) -> dict:
    stats = StageRunner(build_stage(name, cfg), cfg, bootstrap).run(until=lambda s: s.counters["consumed"] >= expect)
    return dict(stats.counters)


@pytest.mark.slow
def test_ingest_to_pairs_records_agree_across_topics(bus, tiny_cfg, tmp_path) -> None:
    specs = T.load_specs()
    documents = load_corpus()[:4]
    produce_documents(tiny_cfg.bus, bus.bootstrap, documents)

    split = run_stage("split", tiny_cfg, bus.bootstrap, 4)
    n_items = split["produced"]
    assert n_items == 8  # 4 documents × max_items_per_document
    for name in ("rewrite", "rollout", "judge", "assemble"):
        counters = run_stage(name, tiny_cfg, bus.bootstrap, n_items)
        assert counters["processed"] == n_items and counters.get("deadlettered", 0) == 0, (name, counters)

    topics = {t: bus.values(t, expect=n_items) for t in (T.PREFIXES, T.REWRITTEN, T.ROLLOUTS, T.JUDGED, T.PAIRS)}
    for topic, values in topics.items():
        assert len(values) == n_items, topic
        assert all(specs[topic].errors(v) == [] for v in values), topic
    by_id = {t: {v["item_id"]: v for v in values} for t, values in topics.items()}
    docs = {d["doc_id"]: d for d in documents}
    for item_id, prefix_item in by_id[T.PREFIXES].items():
        # Each item's prefix + suffix is a piece of its document.
        assert (prefix_item["prefix"] + prefix_item["suffix"]) in docs[prefix_item["doc_id"]]["text"]
        rewritten, rolled, judged, pair = (by_id[t][item_id] for t in (T.REWRITTEN, T.ROLLOUTS, T.JUDGED, T.PAIRS))
        # Enrichment keeps what came before.
        assert {k: rewritten[k] for k in prefix_item} == prefix_item
        assert {k: rolled[k] for k in rewritten} == rewritten
        assert len(rolled["rollouts"]) == 2 and rolled["policy_version"] == 0
        # Every candidate was judged exactly once.
        judged_keys = sorted((s["kind"], s["index"]) for s in judged["scores"])
        expected = [("original", 0)] + ([("rewrite", 0)] if rolled["rewrite"] is not None else []) + [("rollout", 0), ("rollout", 1)]
        assert judged_keys == sorted(expected)
        totals = {(s["kind"], s["index"]): s["total"] for s in judged["scores"]}
        texts = {("original", 0): judged["suffix"], ("rewrite", 0): judged["rewrite"],
                 ("rollout", 0): judged["rollouts"][0], ("rollout", 1): judged["rollouts"][1]}
        # Pairs reference real candidates, and chosen outscores rejected.
        if pair["chosen"] is not None:
            for side in ("chosen", "rejected"):
                key = (pair[side]["kind"], pair[side]["index"])
                assert pair[side]["text"] == texts[key] and pair[side]["total"] == totals[key]
            assert pair["chosen"]["total"] > pair["rejected"]["total"]
            assert pair["chosen"]["total"] == max(totals.values())
        else:
            assert pair["why"]
        assert pair["target"]["total"] == max(totals.values())

    # Re-judge the recorded rollouts with another judge setting (safety only), into new topics.
    run_dir = tmp_path / "runs" / "pipeline"
    pipeline_manifest(run_dir, tiny_cfg, bus.bootstrap, topics=[T.ROLLOUTS, T.JUDGED])
    replay = replay_stage("judge", run_dir, overrides=["judge.weights.quality=0", "judge.weights.factuality=0"],
                          timeout_s=300)
    assert (replay.input_records, replay.output_records, replay.deadlettered) == (n_items, n_items, 0)
    replay_bus = type(bus)(merged(tiny_cfg, bus={"topic_prefix": replay.topic_prefix}), bus.bootstrap)
    rejudged = {v["item_id"]: v for v in replay_bus.values(T.JUDGED, expect=n_items)}
    assert rejudged.keys() == by_id[T.JUDGED].keys()
    for item_id, item in rejudged.items():
        # Same candidates and the same safety scores (same judge, same inputs); totals now count safety alone.
        before = {(s["kind"], s["index"]): s for s in by_id[T.JUDGED][item_id]["scores"]}
        for score in item["scores"]:
            old = before[(score["kind"], score["index"])]
            assert score["safety"] == pytest.approx(old["safety"], abs=1e-5)
            assert score["total"] == pytest.approx(score["safety"], abs=1e-5) or score["total"] < 0  # gated unsafe
    assert len(bus.values(T.JUDGED, expect=n_items)) == n_items  # the original topic is untouched


@pytest.mark.slow
def test_two_rollout_workers_in_one_group_split_the_work(bus) -> None:
    cfg = merged(bus.cfg, models=TINY, rollout={"rollouts": 1}, runner={"batch_size": 4})
    items = [{"item_id": f"d{i}:1", "doc_id": f"d{i}", "chunk_index": 1, "prefix": "Once upon a time",
              "suffix": " there lived", "seed": i, "rewrite": None, "why": []} for i in range(60)]
    bus.produce(T.REWRITTEN, items)
    runners = [StageRunner(build_stage("rollout", cfg), cfg, bus.bootstrap, instance_id=f"rollout-{k}") for k in range(2)]
    total = lambda: sum(r.stats.counters["consumed"] for r in runners)  # noqa: E731
    threads = [threading.Thread(target=r.run, kwargs={"until": lambda s: total() >= 60}) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    shares = [r.stats.counters["consumed"] for r in runners]
    assert sum(shares) >= 60 and all(share > 0 for share in shares), shares
    out = bus.values(T.ROLLOUTS, expect=60)
    assert sorted({o["item_id"] for o in out}) == sorted(i["item_id"] for i in items)
