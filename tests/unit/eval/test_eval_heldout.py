"""Held-out data never reaches training: the splits are disjoint and the default ingest skips them."""

from __future__ import annotations

import pytest

from sipstream import data
from sipstream.eval import heldout
from sipstream.eval.sets import (
    fact_pairs,
    perplexity_texts,
    safety_prompts,
    winrate_prompts,
)


def test_corpus_split_is_disjoint_complete_and_about_one_in_eight() -> None:
    held = {doc["doc_id"] for doc in heldout.heldout_corpus()}
    train = {doc["doc_id"] for doc in heldout.training_corpus()}
    everything = {doc["doc_id"] for doc in data.load_corpus()}
    assert held and train and not held & train
    assert held | train == everything
    assert 4 <= len(held) <= 12  # 64 documents, 1 in 8 expected
    assert {doc["meta"]["author"] for doc in heldout.heldout_corpus()} == {"Jane Austen", "Herman Melville"}


@pytest.mark.parametrize("name", ["false_claims", "toxicity_prompts", "unsafe_prompts"])
def test_probe_splits_are_disjoint_and_complete(name: str) -> None:
    held = {p["probe_id"] for p in heldout.heldout_probes(name)}
    train = {p["probe_id"] for p in heldout.training_probes(name)}
    assert held and train and not held & train
    assert held | train == {p["probe_id"] for p in data.load_probes(name)}


def test_split_depends_on_the_id_only() -> None:
    # Stable across processes and file order: a fixed, known assignment.
    assert heldout.is_heldout("corpus", "austen-emma-ch11-0")
    assert not heldout.is_heldout("corpus", "austen-sense-ch04-0")


def test_default_ingest_never_yields_a_heldout_document() -> None:
    from sipstream.ops.ingest import BUILTIN_CORPUS, iter_documents

    ingested = [doc["doc_id"] for doc in iter_documents([BUILTIN_CORPUS])]
    held = {doc["doc_id"] for doc in heldout.heldout_corpus()}
    assert ingested == [doc["doc_id"] for doc in heldout.training_corpus()]
    assert not held & set(ingested)


def test_every_eval_set_comes_from_the_heldout_split() -> None:
    held_docs = {doc["doc_id"] for doc in heldout.heldout_corpus()}
    prompts = winrate_prompts(40, prefix_words=96, suffix_words=28)
    assert {p.prompt_id.rsplit("@", 1)[0] for p in prompts} == held_docs  # round-robin covers every document
    assert {doc_id for doc_id, _ in perplexity_texts(len(held_docs))} == held_docs
    held_toxic = {p["probe_id"] for p in heldout.heldout_probes("toxicity_prompts")}
    assert {p.prompt_id for p in safety_prompts(len(held_toxic))} == held_toxic
    held_false = {p["probe_id"] for p in heldout.heldout_probes("false_claims")}
    pairs = fact_pairs(len(data.load_heldout("factuality_pairs")))
    assert {pair.probe_id for pair in pairs} <= held_false


def test_factuality_pairs_are_well_formed() -> None:
    claims = {p["probe_id"]: p for p in data.load_probes("false_claims")}
    pairs = data.load_heldout("factuality_pairs")
    assert len(pairs) >= 120
    assert len({p["probe_id"] for p in pairs}) == len(pairs)
    for pair in pairs:
        assert pair["false"] == claims[pair["probe_id"]]["text"]  # the false side is the shipped claim, verbatim
        assert pair["category"] == claims[pair["probe_id"]]["category"]
        assert pair["true"].strip() and pair["true"] != pair["false"]
    assert {p["category"] for p in pairs} == {"animals", "cities", "companies", "elements", "facts", "inventions"}
