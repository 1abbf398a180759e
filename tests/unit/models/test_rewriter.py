"""The rewriter on real tiny models: its input repeats the prefix's last words, a safe suffix is
left alone, a rewrite is kept only when the judge scores it above the original, else why not."""

from __future__ import annotations

from sipstream.config.models import JudgeSpec, RewriterSpec
from sipstream.models.judge import Judge
from sipstream.models.rewriter import Rewriter, RewriteRequest, clean_rewrite, copy_overlap

PREFIX = "The old sailor leaned over the rail and told the boy how to"
SUFFIX = " tie a bowline knot that would hold in any storm."


def test_prompt_repeats_the_last_five_prefix_words_before_the_suffix(tiny_model):
    rewriter = Rewriter(tiny_model, Judge(tiny_model))
    prompt = rewriter.prompt(PREFIX, SUFFIX)
    assert "ORIGINAL: told the boy how to tie a bowline knot" in prompt
    assert prompt.endswith("REWRITTEN: told the boy how to")
    assert not prompt.startswith("#")


def test_clean_rewrite_cuts_a_run_on_into_a_new_example():
    assert clean_rewrite(" a safe ending.\nPREFIX: next example") == " a safe ending."
    assert clean_rewrite(" line one\nline two  ") == " line one\nline two"


def test_a_suffix_judged_safe_is_left_unchanged(yes_judge_model, paper_prompts_dir):
    # The trained judge answers YES to every "is it safe?" question (uncalibrated: calibration
    # would rightly call a judge that always says YES opinionless).
    judge = Judge(yes_judge_model, JudgeSpec(calibrate=False, prompts_dir=paper_prompts_dir))
    rewriter = Rewriter(yes_judge_model, judge)
    result = rewriter.rewrite(PREFIX, SUFFIX, seed=3)
    assert result.rewrite is None
    assert "judged safe" in result.why
    assert result.flags["original_safety"] > 0.9


def test_a_rewrite_is_kept_only_if_it_beats_the_original(tiny_model):
    judge = Judge(tiny_model, JudgeSpec(unsafe_never_outranks_safe=False))
    rewriter = Rewriter(tiny_model, judge, RewriterSpec(only_rewrite_unsafe=False, rewrite_candidates=3))
    result = rewriter.rewrite(PREFIX, SUFFIX, seed=4)
    assert result.candidates_tried == 3
    assert result.original_scores is not None and result.rewrite_scores is not None
    if result.rewrite is not None:
        assert result.rewrite_scores.total > result.original_scores.total
        assert result.rewrite.strip() != SUFFIX.strip()
        assert "judged better" in result.why
    else:
        assert result.rewrite_scores.total <= result.original_scores.total
        assert "no rewrite beat the original" in result.why


def test_no_rewrite_with_a_reason_when_none_clears_the_margin(tiny_model):
    spec = RewriterSpec(only_rewrite_unsafe=False, rewrite_candidates=2, min_gain=10.0)
    result = Rewriter(tiny_model, Judge(tiny_model), spec).rewrite(PREFIX, SUFFIX, seed=4)
    assert result.rewrite is None
    assert result.why.startswith("no rewrite beat the original")


def test_rewrite_budget_follows_the_suffix_length(tiny_model):
    spec = RewriterSpec(only_rewrite_unsafe=False, rewrite_candidates=2, length_slack=1.0, min_gain=10.0)
    rewriter = Rewriter(tiny_model, Judge(tiny_model), spec)
    request = RewriteRequest(PREFIX, SUFFIX, seed=1)
    assert rewriter._budget(request) == tiny_model.count_tokens(SUFFIX)
    assert rewriter._budget(RewriteRequest(PREFIX, SUFFIX, max_new_tokens=5)) == 5


def test_batched_rewrites_equal_one_by_one(tiny_model):
    judge = Judge(tiny_model, JudgeSpec(unsafe_never_outranks_safe=False))
    rewriter = Rewriter(tiny_model, judge, RewriterSpec(only_rewrite_unsafe=False, rewrite_candidates=2))
    requests = [RewriteRequest(PREFIX, SUFFIX, seed=1), RewriteRequest("Call me Ishmael.", " Some years ago", seed=2)]
    together = rewriter.rewrite_many(requests)
    alone = [rewriter.rewrite_many([request])[0] for request in requests]
    assert [result.rewrite for result in together] == [result.rewrite for result in alone]
    assert [result.why for result in together] == [result.why for result in alone]


def test_copy_overlap_spots_near_copies():
    original = " he would smash the skull in and leave him bleeding in the gutter."
    assert copy_overlap(original, original) == 1.0
    assert copy_overlap(original, original + "\nThey said:") == 1.0
    assert copy_overlap(original, " he would smash the skull in and leave him lying in the road.") > 0.5
    assert copy_overlap(original, " he calmed down and walked home to apologise.") == 0.0
    assert copy_overlap("", " anything") == 0.0

