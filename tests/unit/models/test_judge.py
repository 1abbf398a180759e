"""The judge on real tiny models: score ranges, pairwise bookkeeping and cost, position-bias
cancellation, the safety gate, generative verdict parsing and its explicit failure."""

from __future__ import annotations

import pytest

from sipstream.config.models import CriterionWeights, JudgeSpec
from sipstream.models.judge import Judge, JudgeRequest, JudgeVerdictError, parse_verdict

PREFIX = "Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that"
ORIGINAL = " the experience of three and twenty years had been insufficient to make his wife understand his character."
CANDIDATES = [ORIGINAL, " banana banana banana banana", " he left the house.", " {candidate} braces stay text"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (" YES", "YES"),
        (" no, because it is fine", "NO"),
        ("Let me think. The text is mild. FINAL DECISION: YES", "YES"),
        ("FINAL DECISION: NO ... on reflection FINAL DECISION: **YES**", "YES"),
        (" maybe", None),
        ("The answer is unclear.", None),
        ("", None),
    ],
)
def test_parse_safety_verdict(answer, expected):
    assert parse_verdict(answer, ["YES", "NO"], r"FINAL DECISION:\s*\**\s*({labels})\b") == expected


def test_parse_quality_and_factuality_verdicts():
    quality_pattern = r"FINAL ANSWER:\s*\**\s*(?:Option\s*)?({labels})\b"
    assert parse_verdict(" 2", ["1", "2"], quality_pattern) == "2"
    assert parse_verdict(" Option 1 is better", ["1", "2"], quality_pattern) == "1"
    assert parse_verdict("Both are fine. FINAL ANSWER: Option 2", ["1", "2"], quality_pattern) == "2"
    assert parse_verdict(" 3", ["1", "2"], quality_pattern) is None
    from sipstream.models.judge import _VERDICT_CUE

    shipped_pattern = _VERDICT_CUE + r"\s*\**\s*(?:Option\s*)?({labels})\b"
    assert parse_verdict("Option 2 is jumbled.\nBetter: Option 1", ["1", "2"], shipped_pattern) == "1"
    factuality_pattern = r"FINAL DECISION:\s*\**\s*({labels})\b"
    labels = ["NONE", "POSSIBLE", "DEFINITE"]
    assert parse_verdict(" POSSIBLE hallucination", labels, factuality_pattern) == "POSSIBLE"
    assert parse_verdict(" yes", labels, factuality_pattern) is None


def test_logit_scores_are_probabilities_and_pairwise_cost_is_reported(tiny_model):
    judge = Judge(tiny_model, JudgeSpec(unsafe_never_outranks_safe=False))
    result = judge.score(PREFIX, ORIGINAL, CANDIDATES, seed=5)
    n = len(CANDIDATES)
    assert result.pairwise_calls == n * (n - 1) == 12
    assert result.pointwise_calls == 2 * n
    for scores in result.scores:
        for value in (scores.quality, scores.safety, scores.factuality):
            assert 0.0 <= value <= 1.0
        assert scores.total == pytest.approx(scores.quality + scores.safety + scores.factuality)
        assert not scores.gated
    # Each comparison hands out exactly one unit of win, so the mean quality is exactly 0.5.
    assert sum(scores.quality for scores in result.scores) / n == pytest.approx(0.5)


def test_weights_shape_the_total(tiny_model):
    spec = JudgeSpec(weights=CriterionWeights(quality=2.0, safety=0.0, factuality=0.5),
                     unsafe_never_outranks_safe=False)
    result = Judge(tiny_model, spec).score(PREFIX, ORIGINAL, CANDIDATES[:2])
    assert len(result.scores) == 2  # one per candidate, so the loop below checks something
    for scores in result.scores:
        assert scores.total == pytest.approx(2.0 * scores.quality + 0.5 * scores.factuality)


def test_single_candidate_has_neutral_quality_and_no_pairwise_cost(tiny_model):
    result = Judge(tiny_model).score(PREFIX, ORIGINAL, [ORIGINAL])
    assert result.pairwise_calls == 0
    assert result.scores[0].quality == 0.5


def test_batched_items_equal_items_judged_alone(tiny_model):
    judge = Judge(tiny_model)
    requests = [
        JudgeRequest(PREFIX, ORIGINAL, tuple(CANDIDATES[:3]), seed=1),
        JudgeRequest("Call me Ishmael.", " Some years ago", (" Some years ago", " I sailed."), seed=2),
    ]
    together = judge.score_many(requests)
    alone = [judge.score_many([request])[0] for request in requests]
    assert [len(r.scores) for r in together] == [len(r.scores) for r in alone] == [3, 2]
    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched.scores, single.scores, strict=True):
            assert a.total == pytest.approx(b.total, abs=1e-5)


def test_safety_gate_puts_every_unsafe_candidate_below_every_safe_one(tiny_model):
    ungated = Judge(tiny_model, JudgeSpec(unsafe_never_outranks_safe=False)).score(PREFIX, ORIGINAL, CANDIDATES)
    safeties = sorted(scores.safety for scores in ungated.scores)
    threshold = (safeties[1] + safeties[2]) / 2  # two candidates fall below, two above
    gated = Judge(tiny_model, JudgeSpec(safety_threshold=threshold)).score(PREFIX, ORIGINAL, CANDIDATES)
    unsafe = [scores for scores in gated.scores if scores.gated]
    safe = [scores for scores in gated.scores if not scores.gated]
    assert len(unsafe) == 2 and len(safe) == 2
    assert max(scores.total for scores in unsafe) < 0 <= min(scores.total for scores in safe)
    # Within the unsafe group the order is kept.
    for plain, shifted in zip(ungated.scores, gated.scores, strict=True):
        expected = plain.total - (4.0 if shifted.gated else 0.0)
        assert shifted.total == pytest.approx(expected, abs=1e-5)


def test_a_fully_position_biased_judge_gives_equal_quality(yes_judge_model):
    # The trained judge always answers "Option 1": asking both orders cancels the bias exactly.
    judge = Judge(yes_judge_model)
    qualities = [scores.quality for scores in judge.score(PREFIX, ORIGINAL, CANDIDATES).scores]
    assert qualities == pytest.approx([0.5] * len(CANDIDATES), abs=0.02)


def test_coherence_is_the_pmi_of_the_models_own_logprobs(tiny_model):
    judge = Judge(tiny_model, JudgeSpec(quality_coherence_weight=0.5))
    got = judge.coherence([PREFIX, PREFIX], CANDIDATES[:2])
    expected = [tiny_model.logprobs([PREFIX], [candidate])[0] - tiny_model.logprobs(["\n"], [candidate])[0]
                for candidate in CANDIDATES[:2]]
    assert got == pytest.approx(expected, abs=1e-4)
    assert judge.coherence([], []) == []


def test_the_coherence_vote_decides_what_a_position_biased_prompt_cannot(yes_judge_model):
    # This judge always answers "Option 1", so its prompt votes cancel to 0.5: the blend moves a pair
    # exactly by the coherence vote, a logistic of the PMI difference.
    import math

    judge = Judge(yes_judge_model, JudgeSpec(quality_coherence_weight=0.5, quality_coherence_scale=4.0))
    banana = CANDIDATES[1]
    quality = judge.pairwise_quality([PREFIX] * 2, [ORIGINAL, banana], [banana, ORIGINAL], [0, 1])
    pmi = judge.coherence([PREFIX] * 2, [ORIGINAL, banana])
    vote = 1.0 / (1.0 + math.exp(-(pmi[0] - pmi[1]) / 4.0))
    assert abs(vote - 0.5) > 0.05  # the two candidates differ in coherence
    assert quality[0] == pytest.approx(0.5 * 0.5 + 0.5 * vote, abs=0.01)
    assert quality[0] + quality[1] == pytest.approx(1.0, abs=1e-6)  # symmetric in the order asked


def test_coherence_prefers_the_continuation_that_belongs_to_the_prefix(tiny_spec):
    # A model that knows one text: its true continuation beats the same words jumbled and a passage
    # from elsewhere, which a 270M judge's prompt cannot tell apart (judge-eval off-topic 0.46).
    from sipstream.models.hf import HFModel
    from sipstream.models.tiny import fit_texts

    model = HFModel(tiny_spec.model_copy(update={"seed": 2}))
    assert fit_texts(model, [PREFIX + ORIGINAL], steps=120) < 0.2
    judge = Judge(model, JudgeSpec(quality_coherence_weight=1.0))
    jumbled = " " + " ".join(reversed(ORIGINAL.split()))
    elsewhere = " Some years ago, never mind how long precisely, having little or no money in my purse,"
    pmi = judge.coherence([PREFIX] * 3, [ORIGINAL, jumbled, elsewhere])
    assert pmi[0] > max(pmi[1], pmi[2])
    quality = judge.pairwise_quality([PREFIX] * 2, [ORIGINAL] * 2, [jumbled, elsewhere], [0, 1])
    assert min(quality) > 0.5


def test_coherence_in_score_many_keeps_the_bookkeeping(tiny_model):
    judge = Judge(tiny_model, JudgeSpec(quality_coherence_weight=0.5, unsafe_never_outranks_safe=False))
    requests = [JudgeRequest(PREFIX, ORIGINAL, tuple(CANDIDATES), seed=1),
                JudgeRequest("Call me Ishmael.", " Some years ago", (" Some years ago", " I sailed."), seed=2)]
    together = judge.score_many(requests)
    n = len(CANDIDATES)
    assert together[0].pointwise_calls == 2 * n + 2 * n  # safety + factuality, then two coherence passes each
    assert sum(scores.quality for scores in together[0].scores) / n == pytest.approx(0.5)
    alone = [judge.score_many([request])[0] for request in requests]
    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched.scores, single.scores, strict=True):
            assert a.total == pytest.approx(b.total, abs=1e-5)


def test_logit_safety_reads_the_yes_probability(yes_judge_model, tiny_model, paper_prompts_dir):
    paper_judge = Judge(yes_judge_model, JudgeSpec(calibrate=False, prompts_dir=paper_prompts_dir))
    trained = paper_judge.safety_scores([PREFIX] * 2, CANDIDATES[:2], [0, 1])
    untrained = Judge(tiny_model, JudgeSpec(calibrate=False)).safety_scores([PREFIX] * 2, CANDIDATES[:2], [0, 1])
    assert all(value > 0.9 for value in trained)
    assert all(0.2 < value < 0.8 for value in untrained)  # a random model has no opinion


def test_calibration_centres_content_free_input_and_keeps_the_ranking(yes_judge_model, paper_prompts_dir):
    # A judge that says YES to everything is calibrated to "no opinion" on empty input.
    calibrated = Judge(yes_judge_model, JudgeSpec(prompts_dir=paper_prompts_dir))
    assert calibrated.safety_scores([""], ["N/A"], [0])[0] == pytest.approx(0.5, abs=0.1)
    uncalibrated = Judge(yes_judge_model, JudgeSpec(calibrate=False, prompts_dir=paper_prompts_dir))
    raw = uncalibrated.safety_scores([PREFIX] * 4, CANDIDATES, [0] * 4)
    adjusted = calibrated.safety_scores([PREFIX] * 4, CANDIDATES, [0] * 4)
    assert sorted(range(4), key=raw.__getitem__) == sorted(range(4), key=adjusted.__getitem__)


def test_a_prompt_asking_for_unsafety_flips_the_verdict(tiny_model, tmp_path):
    from sipstream.models.prompts import DEFAULT_PROMPTS_DIR

    for name in ("judge_quality", "judge_factuality"):
        (tmp_path / f"{name}.txt").write_text((DEFAULT_PROMPTS_DIR / f"{name}.txt").read_text())
    question = "Text: {prefix}{candidate}\nIs it harmful? FINAL DECISION:"
    (tmp_path / "judge_safety.txt").write_text("# yes-means: unsafe\n" + question)
    flipped = Judge(tiny_model, JudgeSpec(prompts_dir=tmp_path, calibrate=False))
    (tmp_path / "judge_safety.txt").write_text("# yes-means: safe\n" + question)
    plain = Judge(tiny_model, JudgeSpec(prompts_dir=tmp_path, calibrate=False))
    assert flipped.safe_verdict == "NO" and plain.safe_verdict == "YES"
    a = flipped.safety_scores([PREFIX], [ORIGINAL], [0])[0]
    b = plain.safety_scores([PREFIX], [ORIGINAL], [0])[0]
    assert a == pytest.approx(1.0 - b, abs=1e-6)


def test_generative_safety_samples_and_parses_verdicts(yes_judge_model, paper_prompts_dir):
    judge = Judge(yes_judge_model, JudgeSpec(mode="generate", safety_samples=3, verdict_max_new_tokens=4,
                                             temperature=0.3, prompts_dir=paper_prompts_dir))
    assert judge.safety_scores([PREFIX, PREFIX], CANDIDATES[:2], [3, 4]) == [1.0, 1.0]


def test_unparsable_generative_verdict_is_an_explicit_failure(yes_judge_model, tiny_model, paper_prompts_dir):
    # The trained judge answers factuality questions with "YES", which is no factuality verdict.
    judge = Judge(yes_judge_model, JudgeSpec(mode="generate", verdict_max_new_tokens=4, temperature=0.3,
                                             prompts_dir=paper_prompts_dir))
    with pytest.raises(JudgeVerdictError) as raised:
        judge.score(PREFIX, ORIGINAL, CANDIDATES[:2])
    assert raised.value.criterion == "factuality"
    # A random model writes gibberish: safety fails first, never a silent default score.
    with pytest.raises(JudgeVerdictError, match="safety"):
        Judge(tiny_model, JudgeSpec(mode="generate", verdict_max_new_tokens=3)).score(PREFIX, ORIGINAL, CANDIDATES[:2])


def test_prompt_files_are_used_without_their_comment_header(tiny_model):
    judge = Judge(tiny_model)
    for template in judge.templates.values():
        assert not template.startswith("#")
        assert "arXiv" not in template
    assert judge.templates["judge_safety"].endswith("Toxic or dangerous:")
    assert judge.safe_verdict == "NO"  # the shipped safety prompt asks for unsafety
    assert judge.templates["judge_quality"].endswith("Better: Option")


def test_a_template_with_wrong_placeholders_is_rejected(tiny_model, tmp_path):
    from sipstream.models.prompts import DEFAULT_PROMPTS_DIR

    for name in ("judge_safety", "judge_quality", "judge_factuality"):
        (tmp_path / f"{name}.txt").write_text((DEFAULT_PROMPTS_DIR / f"{name}.txt").read_text())
    (tmp_path / "judge_safety.txt").write_text("PREFIX: {prefix}\nFINAL DECISION:")
    with pytest.raises(ValueError, match="placeholders"):
        Judge(tiny_model, JudgeSpec(prompts_dir=tmp_path))


@pytest.mark.parametrize(
    ("prefix", "candidate", "reads"),
    [
        ("The cows came home to the barn,", " where the cows were fed.", "the barn, where the cows were fed."),
        ("The cows came home to the barn, ", "where the cows were fed.", "the barn, where the cows were fed."),
        ("The cows came home to the barn,", "where the cows were fed.", "the barn, where the cows were fed."),
        ("They walked across the farm", "yard at dawn.", "the farmyard at dawn."),
        ("He said nothing", ", and left.", "said nothing, and left."),
        ("She wrote (", "in pencil) a note.", "She wrote (in pencil) a note."),
    ],
)
def test_safety_prompt_reads_prefix_and_candidate_as_one_text(tiny_model, prefix, candidate, reads):
    """The shipped safety prompt reads `{prefix}{candidate}` as one comment: the words at the boundary
    keep the spacing of the original text (it read "…the barn, wherethe cows…" before)."""
    prompt = Judge(tiny_model).safety_prompts([prefix], [candidate])[0]
    comment = prompt.rsplit("Comment: ", 1)[1].split("\n", 1)[0]
    assert comment.endswith(reads), comment
    assert "  " not in comment
