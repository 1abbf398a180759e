"""Judge-eval set construction and metrics (fast), plus one end-to-end run on the tiny model."""

from __future__ import annotations

import random

import pytest

from sipstream.eval.judge_builtin import (
    SPOIL_KINDS,
    build_eval_sets,
    character_names,
    roc_auc,
    run_judge_eval,
    spoil,
    swap_names,
)
from sipstream.models.judge import Judge


def test_roc_auc_against_hand_counts():
    assert roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert roc_auc([0.1, 0.9], [1, 0]) == 0.0
    assert roc_auc([0.5, 0.5, 0.2, 0.7], [1, 0, 0, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    with pytest.raises(ValueError):
        roc_auc([0.5], [1])


def test_sets_are_labelled_balanced_and_reproducible():
    sets = build_eval_sets(seed=3)
    assert sets == build_eval_sets(seed=3)
    safety_labels = [label for *_, label in sets["safety"]]
    assert safety_labels.count(0) == safety_labels.count(1) > 50
    assert {kind for *_, kind in sets["quality"]} == set(SPOIL_KINDS)
    factuality_labels = [label for *_, label in sets["factuality"]]
    assert factuality_labels.count(0) == factuality_labels.count(1) > 30
    for prefix, original, spoiled, _ in sets["quality"]:
        assert prefix and original.strip() and spoiled.strip() != original.strip()
    limited = build_eval_sets(seed=3, limit=10)
    assert [label for *_, label in limited["safety"]].count(0) == 5
    assert len(limited["quality"]) == 10


def test_spoilers_damage_the_suffix_in_their_own_way():
    rng = random.Random(0)
    suffix = " one two three four five six seven eight nine ten eleven twelve"
    shuffled = spoil(suffix, "shuffled", rng, " other")
    assert sorted(shuffled.split()) == sorted(suffix.split()) and shuffled != suffix
    repeated = spoil(suffix, "repeated", rng, " other").split()
    assert len(repeated) == 12 and len(set(repeated)) == 3
    assert spoil(suffix, "truncated", rng, " other").split() == ["one", "two", "three"]
    assert spoil(suffix, "off_topic", rng, " other") == " other"
    with pytest.raises(ValueError):
        spoil(suffix, "burnt", rng, " other")


def test_name_swaps_replace_characters_with_other_characters():
    passages = ["and then Emma said", "but Emma knew", "so Emma left", "and Harriet wept", "but Harriet",
                "so Harriet", "and Knightley came", "or Knightley", "but Knightley"]
    names = character_names(passages)
    assert names == ["Emma", "Harriet", "Knightley"]
    swapped = swap_names(" Emma smiled at Harriet.", names, random.Random(1))
    assert swapped == " Knightley smiled at Knightley."
    assert swap_names(" nobody here", names, random.Random(1)) is None


def test_run_judge_eval_end_to_end_on_the_tiny_model(tiny_model):
    progress = []
    report = run_judge_eval(Judge(tiny_model), limit=6, progress=progress.append)
    assert report.safety_items == 6 and report.quality_pairs == 6 and report.factuality_items == 6
    for value in (report.safety_auc, report.quality_accuracy, report.factuality_auc):
        assert 0.0 <= value <= 1.0
    assert set(report.quality_accuracy_by_spoil) <= set(SPOIL_KINDS)
    assert report.judge_prompts == 6 + 2 * 6 + 6
    assert len(progress) == 3
    with pytest.raises(ValueError, match="criteria"):
        run_judge_eval(Judge(tiny_model), criteria=("style",))
