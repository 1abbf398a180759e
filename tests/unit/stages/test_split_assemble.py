"""Stage logic called straight into lists, no broker (STYLE.md)."""

from __future__ import annotations

import pytest

from sipstream.config import ItemsConfig, PairsConfig
from sipstream.stages.assemble import AssembleStage
from sipstream.stages.split import SplitStage, cut_document


class CharTokenizer:
    """One token per character: makes chunk boundaries easy to read in assertions."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(i) for i in token_ids)


def items(**kw) -> ItemsConfig:
    return ItemsConfig(**{"suffix_tokens": 4, "max_context_tokens": 10, "min_suffix_tokens": 2, **kw})


def test_chunks_are_contiguous_and_prefixes_cut_from_the_left() -> None:
    chunks = cut_document(list(range(17)), items())
    assert [c.suffix_ids for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # The 1-token tail (16) is shorter than min_suffix_tokens and dropped.
    assert chunks[0].prefix_ids == []
    assert chunks[1].prefix_ids == [0, 1, 2, 3]
    # prefix + suffix <= max_context_tokens (10): the prefix keeps its last 6 tokens.
    assert chunks[3].prefix_ids == [6, 7, 8, 9, 10, 11]
    assert all(len(c.prefix_ids) + len(c.suffix_ids) <= 10 for c in chunks)


def test_min_prefix_and_max_items() -> None:
    chunks = cut_document(list(range(20)), items(min_prefix_tokens=5, max_items_per_document=2))
    assert [c.chunk_index for c in chunks] == [2, 3]


def test_split_stage_items_are_stable_and_seeded() -> None:
    stage = SplitStage(CharTokenizer(), items(), run_seed=7)
    doc = {"doc_id": "d1", "text": "abcdefghij", "source": "t"}
    out = stage.process(doc)
    assert [(o["item_id"], o["prefix"], o["suffix"]) for o in out] == [
        ("d1:0", "", "abcd"), ("d1:1", "abcd", "efgh"), ("d1:2", "cdefgh", "ij")]  # prefix cut to 6
    assert out == stage.process(doc)  # re-ingesting gives the same items and seeds
    assert len({o["seed"] for o in out}) == 3
    assert SplitStage(CharTokenizer(), items(), run_seed=8).process(doc)[0]["seed"] != out[0]["seed"]


def test_split_with_the_gpt2_tokenizer_round_trips_text() -> None:
    from transformers import GPT2Tokenizer

    from sipstream.models.sources import resolve_source

    tok = GPT2Tokenizer.from_pretrained(resolve_source("tiny-gpt2", "~/.cache/sipstream/models"))

    class Plain:
        def encode(self, text: str) -> list[int]:
            return tok.encode(text)

        def decode(self, ids: list[int]) -> str:
            return tok.decode(ids)

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
    out = SplitStage(Plain(), ItemsConfig(suffix_tokens=8, max_context_tokens=2048, min_suffix_tokens=1)).process(
        {"doc_id": "austen", "text": text, "source": "t"})
    assert out[-1]["prefix"] + out[-1]["suffix"] == text
    assert all(len(tok.encode(o["suffix"])) <= 8 for o in out)


def judged(scores: list[tuple[str, int, float]], rewrite: str | None = "rewritten", rollouts=("r0", "r1")) -> dict:
    return {"item_id": "d:0", "doc_id": "d", "chunk_index": 0, "prefix": "p", "suffix": "orig", "seed": 1,
            "rewrite": rewrite, "why": [], "rollouts": list(rollouts), "policy_version": 3,
            "scores": [{"kind": k, "index": i, "quality": 0.5, "safety": 1.0, "factuality": 1.0, "total": t}
                       for k, i, t in scores]}


def test_pair_is_best_vs_worst_and_target_is_best() -> None:
    stage = AssembleStage(PairsConfig())
    (pair,) = stage.process(judged([("original", 0, 2.0), ("rewrite", 0, 2.5), ("rollout", 0, 1.0), ("rollout", 1, 1.5)]))
    assert pair["chosen"] == {"kind": "rewrite", "index": 0, "text": "rewritten", "total": 2.5}
    assert pair["rejected"] == {"kind": "rollout", "index": 0, "text": "r0", "total": 1.0}
    assert pair["target"] == pair["chosen"]
    assert pair["suffix"] == "orig" and pair["policy_version"] == 3 and pair["why"] == []
    assert stage.counters == {"chosen.rewrite": 1, "rejected.rollout": 1, "target.rewrite": 1}


def test_ties_and_margin_give_no_pair() -> None:
    tie = judged([("original", 0, 2.0), ("rollout", 0, 2.0), ("rollout", 1, 2.0)], rewrite=None)
    (out,) = AssembleStage(PairsConfig()).process(tie)
    assert out["chosen"] is None and out["rejected"] is None
    assert out["why"] == ["no pair: best total 2.0000 - worst 2.0000 <= margin 0.0"]
    assert out["target"]["kind"] == "original"  # deterministic tie-break: candidate order
    close = judged([("original", 0, 2.0), ("rollout", 0, 1.9), ("rollout", 1, 1.95)], rewrite=None)
    assert AssembleStage(PairsConfig(margin=0.2)).process(close)[0]["chosen"] is None
    assert AssembleStage(PairsConfig(margin=0.05)).process(close)[0]["chosen"]["kind"] == "original"


def test_identical_texts_are_not_a_pair_and_threshold_filters_target() -> None:
    same = judged([("original", 0, 2.0), ("rollout", 0, 1.0)], rewrite=None, rollouts=("orig",))
    assert AssembleStage(PairsConfig()).process(same)[0]["why"] == ["no pair: best and worst candidates have the same text"]
    low = judged([("original", 0, 0.5), ("rollout", 0, 0.2)], rewrite=None, rollouts=("x",))
    (out,) = AssembleStage(PairsConfig(nll_min_total=1.0)).process(low)
    assert out["target"] is None and out["why"] == ["no target: best total 0.5000 < nll_min_total 1.0"]


def test_duplicate_items_make_one_pair() -> None:
    stage = AssembleStage(PairsConfig())
    item = judged([("original", 0, 2.0), ("rollout", 0, 1.0)], rewrite=None, rollouts=("x",))
    assert len(stage.process(item)) == 1 and stage.process(item) == []
    assert stage.counters["duplicates"] == 1


def test_scores_for_unknown_candidates_are_an_error() -> None:
    with pytest.raises(ValueError, match="unknown candidate"):
        AssembleStage(PairsConfig()).process(judged([("rollout", 5, 1.0)]))
