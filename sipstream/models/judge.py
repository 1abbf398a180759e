"""The judge: scores every candidate suffix of an item for quality, safety and factuality.

As in the paper (docs/design.md, "What the paper fixes"):
- *safety* is pointwise: "is this continuation safe? FINAL DECISION: YES/NO";
- *quality* is pairwise: every ordered pair of candidates is asked "Option 1 or Option 2?", so each
  unordered pair is asked in both orders and position bias cancels; a candidate's quality is its
  mean win probability over its 2·(n−1) comparisons. This costs n·(n−1) prompts for n candidates
  (306 for the paper's 16 rollouts + original + rewrite): they go to the model as one batch and
  the count is reported in :class:`JudgeResult`;
- *factuality* is pointwise against the original suffix: no / possible / definite hallucination
  scores 1 / 0.5 / 0.

Optionally (``quality_coherence_weight``, set in the CPU default) each pairwise quality vote is blended
with a *coherence vote* from the judge model's likelihoods: the candidate whose text the prefix makes
more probable than it is on its own (higher pointwise mutual information) wins it. This rescues a
small judge on continuations that are fluent but belong elsewhere; see :meth:`Judge.coherence`.

Two ways to read a verdict. ``logits`` (default, CPU): one forward pass per prompt reads the
next-token probabilities of the verdict words (P(YES) / (P(YES) + P(NO)), P("1") vs P("2"), the
expected factuality score), so every score is a probability, not a coin flip. ``generate`` (large
judges behind vLLM or an OpenAI-compatible server): the judge writes its answer, which is parsed;
an answer without a recognisable verdict raises :class:`JudgeVerdictError` instead of defaulting.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sipstream.config.models import JudgeSpec
from sipstream.errors import UserError
from sipstream.models.base import (
    ModelError,
    TextModel,
    TokenizerUnavailableError,
    derive_seed,
    distinguishing_tokens,
)
from sipstream.models.judge_heads import JudgeHeads, factuality_evidence, shipped_heads
from sipstream.models.prompts import (
    last_words,
    load_prompt,
    neutralise,
    prompt_directives,
    template_fields,
)
from sipstream.models.prompts import render_prompt as _render_template

_log = logging.getLogger(__name__)

# Verdict label -> the surface forms whose first token counts for it in logit mode. The prompts end
# on a cue followed by a space-less colon or word, so the answer token carries a leading space.
SAFETY_VERDICTS: dict[str, tuple[str, ...]] = {"YES": (" YES", " Yes"), "NO": (" NO", " No")}
QUALITY_VERDICTS: dict[str, tuple[str, ...]] = {"1": (" 1",), "2": (" 2",)}
FACTUALITY_VERDICTS: dict[str, tuple[str, ...]] = {
    "NONE": (" NONE", " None"),
    "POSSIBLE": (" POSSIBLE", " Possible"),
    "DEFINITE": (" DEFINITE", " Definite"),
}
FACTUALITY_SCORES = {"NONE": 1.0, "POSSIBLE": 0.5, "DEFINITE": 0.0}
# Where a generative judge states its verdict: the paper's "FINAL DECISION:"/"FINAL ANSWER:" and the
# answer cues of the shipped prompts ("Better: Option 2", "Toxic or dangerous: NO").
_VERDICT_CUE = r"(?:FINAL DECISION|FINAL ANSWER|Better|Toxic or dangerous|Hallucination):"
# What the coherence vote conditions on for "no prefix": a line break, a neutral start for any tokenizer
# (an empty prompt leaves the first token of a BOS-less tokenizer without context).
_NO_PREFIX = "\n"
# Inputs that carry no content, for calibrating the logit-scored safety verdict.
_CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")

_TEMPLATE_FIELDS = {
    "judge_safety": {"prefix", "candidate"},
    "judge_quality": {"prefix", "option_1", "option_2"},
    "judge_factuality": {"prefix", "reference", "candidate"},
}


class JudgeVerdictError(ModelError):
    """The judge answered without a verdict we can read; never replaced by a default score."""

    def __init__(self, criterion: str, answer: str) -> None:
        self.criterion = criterion
        self.answer = answer
        shown = answer if len(answer) <= 200 else answer[:200] + "..."
        super().__init__(f"unparsable {criterion} verdict from the judge: {shown!r}")


@dataclass(frozen=True)
class CandidateScores:
    """Scores of one candidate, each criterion in [0, 1]; ``total`` is their weighted sum, minus
    (sum of the weights + 1) when the safety gate pushed an unsafe candidate below the safe ones."""

    quality: float
    safety: float
    factuality: float
    total: float
    gated: bool = False

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


@dataclass(frozen=True)
class JudgeRequest:
    """One item to judge: its prefix, its original suffix (the factuality reference) and the
    candidates (usually original, rewrite and rollouts; the order is kept in the result)."""

    prefix: str
    original_suffix: str
    candidates: tuple[str, ...]
    seed: int = 0


@dataclass(frozen=True)
class JudgeResult:
    """Scores per candidate (same order as the request) and what judging them cost in prompts."""

    scores: list[CandidateScores]
    pairwise_calls: int
    pointwise_calls: int


def parse_verdict(answer: str, labels: Sequence[str], final_pattern: str) -> str | None:
    """Find the verdict in a generated answer.

    The last ``final_pattern`` match wins (a large judge may reason first and decide at the end);
    failing that, the answer's first word is the verdict (the prompt ends on the cue, so a terse
    judge answers right away). Anything else is unparsable (None)."""
    alternatives = "|".join(re.escape(label) for label in labels)
    decisions = re.findall(final_pattern.format(labels=alternatives), answer, flags=re.IGNORECASE)
    if decisions:
        return decisions[-1].upper()
    first_word = re.match(r"\s*(?:option\s*)?([A-Za-z0-9]+)", answer, flags=re.IGNORECASE)
    if first_word and first_word.group(1).upper() in labels:
        return first_word.group(1).upper()
    return None


def render_prompt(template: str, **fields: str) -> str:
    """A judge prompt; every field is untrusted text (prefix, candidate, reference) and is neutralised."""
    return _render_template(template, **{name: neutralise(value) for name, value in fields.items()})


# Characters after which a continuation starts without a space ("(the", "'twas"), and before which
# it attaches to the word in front (", and", "."), when neither side of a boundary has whitespace.
_OPENERS = "([{\"'‘“/-"
_CLOSERS = ",.;:!?)]}\"'’”%"


def continuation_separator(prefix: str, candidate: str) -> str:
    """What stands between the end of ``prefix`` and ``candidate`` when they are read as one text.

    Suffixes are cut at token boundaries, so a candidate usually carries its leading space (" where");
    one that was stripped (a rewrite, a hand-written candidate) gets one back after punctuation
    ("barn," + "where"), but a word cut in two by the boundary ("farm" + "yard") stays joined."""
    if not prefix.strip() or not candidate.strip():
        return ""
    if prefix[-1].isspace() or candidate[0].isspace():
        return " "
    if (prefix[-1].isalnum() and candidate[0].isalnum()) or prefix[-1] in _OPENERS or candidate[0] in _CLOSERS:
        return ""
    return " "


def _logsumexp(values: Sequence[float]) -> float:
    finite = [value for value in values if value != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(value - top) for value in finite))


class Judge:
    """Scores candidates with a :class:`TextModel` following a :class:`JudgeSpec`."""

    def __init__(self, model: TextModel, spec: JudgeSpec | None = None) -> None:
        self.model = model
        self.spec = spec or JudgeSpec()
        self.templates = {name: load_prompt(name, self.spec.prompts_dir) for name in _TEMPLATE_FIELDS}
        for name, fields in _TEMPLATE_FIELDS.items():
            if template_fields(self.templates[name]) != fields:
                raise ValueError(
                    f"prompt {name}.txt must use exactly the placeholders {sorted(fields)}, "
                    f"it uses {sorted(template_fields(self.templates[name]))}"
                )
        # Which answer means "safe": the paper asks "is it safe?", a small base model answers
        # "is it toxic or dangerous?" better; the prompt file says which it asks.
        yes_means = prompt_directives("judge_safety", self.spec.prompts_dir).get("yes-means", "safe")
        if yes_means not in ("safe", "unsafe"):
            raise ValueError(f"judge_safety.txt: 'yes-means' must be 'safe' or 'unsafe', not {yes_means!r}")
        self.safe_verdict = "YES" if yes_means == "safe" else "NO"
        self._content_free_safety: dict[str, float] | None = None
        self.heads = self._load_heads()
        self.verdict_forms = {
            "safety": self._distinct_forms(SAFETY_VERDICTS),
            "quality": self._distinct_forms(QUALITY_VERDICTS),
            "factuality": self._distinct_forms(FACTUALITY_VERDICTS),
        }

    def _load_heads(self) -> JudgeHeads | None:
        """The trained heads the spec's modes need (`judge.heads`, else those shipped for this judge);
        sets `safety_reading` / `factuality_reading`, which say how each criterion is actually read."""
        modes = (self.spec.safety_mode, self.spec.factuality_mode)
        self.safety_reading = f"prompt ({self.spec.mode})"
        self.factuality_reading = f"prompt ({self.spec.mode})"
        if modes == ("prompt", "prompt"):
            return None
        source = str(getattr(getattr(self.model, "spec", None), "source", ""))
        path = self.spec.heads or shipped_heads(source)
        local = hasattr(self.model, "hidden_features")
        if path is None or not local:
            if "head" in modes or "likelihood" in modes:
                raise UserError(f"judge.safety_mode=head / factuality_mode=likelihood need heads trained for a local "
                                f"hf judge ({source or 'this model'}): run `sipstream judge-train --out HEADS.json` "
                                "and set judge.heads=HEADS.json")
            _log.info("judge: no trained heads for %s; safety and factuality are read from the prompts", source)
            return None
        try:
            heads = JudgeHeads.load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"judge.heads {path}: not a judge-train file ({exc})") from None
        if self.spec.heads is None and heads.source != source:
            raise UserError(f"the shipped judge heads are for {heads.source}, not {source}; train them for this judge")
        use_safety = self.spec.safety_mode in ("head", "auto") and heads.safety is not None
        use_factuality = self.spec.factuality_mode in ("likelihood", "auto") and heads.factuality is not None
        if self.spec.safety_mode == "head" and not use_safety:
            raise UserError(f"judge.safety_mode=head needs a safety head in {path}")
        if self.spec.factuality_mode == "likelihood" and not use_factuality:
            raise UserError(f"judge.factuality_mode=likelihood needs a factuality calibration in {path}")
        heads = JudgeHeads(heads.source, heads.safety if use_safety else None,
                           heads.factuality if use_factuality else None, heads.trained)
        if heads.safety is not None:
            self.safety_reading = f"head (layer {heads.safety.layer}, {path.name})"
        if heads.factuality is not None:
            self.factuality_reading = f"likelihood (alpha {heads.factuality.alpha:g}, {path.name})"
        return heads

    def _distinct_forms(self, verdicts: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """Keep, per verdict, the surface forms whose distinguishing tokens differ, so no probability
        is counted twice and no token counts for two verdicts (which would make scores meaningless).
        The check mirrors the backends: tokens shared by all forms go to the prompt first."""
        if self.spec.mode != "logits":
            return verdicts
        forms = [form for label_forms in verdicts.values() for form in label_forms]
        try:
            _, token_ids = distinguishing_tokens([self.model.encode(form) for form in forms])
        except TokenizerUnavailableError:
            return verdicts  # a remote model: its server reports tokens by their text, no overlap possible
        token_of = dict(zip(forms, token_ids, strict=True))
        owner: dict[int, str] = {}
        distinct: dict[str, tuple[str, ...]] = {}
        for label, label_forms in verdicts.items():
            kept = []
            for form in label_forms:
                token = token_of[form]
                if token in owner and owner[token] != label:
                    raise ValueError(
                        f"judge verdicts {owner[token]!r} and {label!r} start with the same token for this "
                        "tokenizer; logit scoring cannot tell them apart (use mode 'generate')"
                    )
                if token not in owner:
                    owner[token] = label
                    kept.append(form)
            distinct[label] = tuple(kept)
        return distinct

    # --- reading verdicts ---

    def _verdict_distributions(self, criterion: str, prompts: list[str]) -> list[dict[str, float]]:
        """Logit mode: per prompt, the probability of each verdict, renormalised over the verdicts."""
        forms = self.verdict_forms[criterion]
        options = [form for label_forms in forms.values() for form in label_forms]
        rows = self.model.next_token_logprobs(prompts, options) if prompts else []
        distributions = []
        for prompt_index, option_logprobs in enumerate(rows):
            by_form = dict(zip(options, option_logprobs, strict=True))
            label_logprobs = {label: _logsumexp([by_form[form] for form in label_forms])
                              for label, label_forms in forms.items()}
            normaliser = _logsumexp(list(label_logprobs.values()))
            if normaliser == -math.inf:
                raise JudgeVerdictError(criterion, f"no verdict token among the top log-probs (prompt {prompt_index})")
            distributions.append({label: math.exp(value - normaliser) for label, value in label_logprobs.items()})
        return distributions

    def _generated_verdicts(
        self, criterion: str, prompts: list[str], seeds: list[int], final_pattern: str
    ) -> list[str]:
        """Generative mode: sample an answer per prompt and parse its verdict (or raise)."""
        labels = list(self.verdict_forms[criterion])
        answers = self.model.generate(
            prompts, self.spec.verdict_max_new_tokens, seeds, temperature=self.spec.temperature
        ) if prompts else []
        verdicts = []
        for answer in answers:
            verdict = parse_verdict(answer, labels, final_pattern)
            if verdict is None:
                raise JudgeVerdictError(criterion, answer)
            verdicts.append(verdict)
        return verdicts

    # --- the three criteria ---

    def _shown_prefix(self, prefix: str) -> str:
        return last_words(prefix, self.spec.prefix_max_words).strip()

    def _content_free_safety_distribution(self) -> dict[str, float]:
        """The verdict distribution for inputs with no content (averaged over a few), computed once.

        Small judges lean towards one answer whatever the text; dividing that lean out
        ("contextual calibration", Zhao et al., 2021) keeps the ranking of candidates and makes
        ``safety_threshold`` = 0.5 mean "more unsafe than an empty text"."""
        if self._content_free_safety is None:
            prompts = [render_prompt(self.templates["judge_safety"], prefix="", candidate=candidate)
                       for candidate in _CONTENT_FREE_TEXTS]
            distributions = self._verdict_distributions("safety", prompts)
            self._content_free_safety = {label: sum(d[label] for d in distributions) / len(distributions)
                                         for label in distributions[0]}
        return self._content_free_safety

    @staticmethod
    def _calibrated(distribution: dict[str, float], content_free: dict[str, float]) -> dict[str, float]:
        weights = {label: probability / max(content_free[label], 1e-12) for label, probability in distribution.items()}
        total = sum(weights.values())
        return {label: weight / total for label, weight in weights.items()}

    def safety_prompts(self, prefixes: Sequence[str], candidates: Sequence[str]) -> list[str]:
        """The safety prompt per (prefix, candidate). The prompt may read them as one text
        (``{prefix}{candidate}``), so the shown prefix ends with the separator the original text had at
        the boundary (see :func:`continuation_separator`): "the barn," + " where" reads "the barn, where"."""
        prompts = []
        for prefix, candidate in zip(prefixes, candidates, strict=True):
            shown = self._shown_prefix(prefix)
            if shown:
                shown += continuation_separator(prefix, candidate)
            prompts.append(render_prompt(self.templates["judge_safety"], prefix=shown, candidate=candidate.strip()))
        return prompts

    def safety_scores(self, prefixes: list[str], candidates: list[str], seeds: list[int]) -> list[float]:
        """P(safe) per (prefix, candidate): P(YES) in logit mode, the share of YES among
        ``safety_samples`` sampled verdicts in generative mode."""
        if self.heads is not None and self.heads.safety is not None:
            return self._safety_from_head(prefixes, candidates)
        prompts = self.safety_prompts(prefixes, candidates)
        if self.spec.mode == "logits":
            distributions = self._verdict_distributions("safety", prompts)
            if self.spec.calibrate:
                distributions = [self._calibrated(distribution, self._content_free_safety_distribution())
                                 for distribution in distributions]
            return [distribution[self.safe_verdict] for distribution in distributions]
        samples = self.spec.safety_samples
        sampled_prompts = [prompt for prompt in prompts for _ in range(samples)]
        sampled_seeds = [derive_seed(seed, "safety", sample) for seed in seeds for sample in range(samples)]
        verdicts = self._generated_verdicts("safety", sampled_prompts, sampled_seeds,
                                            _VERDICT_CUE + r"\s*\**\s*({labels})\b")
        return [
            sum(verdict == self.safe_verdict for verdict in verdicts[index * samples:(index + 1) * samples]) / samples
            for index in range(len(prompts))
        ]

    def _safety_from_head(self, prefixes: Sequence[str], candidates: Sequence[str]) -> list[float]:
        """P(safe) from the safety head: the candidate's features read after the prefix's last words."""
        head = self.heads.safety  # type: ignore[union-attr]
        contexts = []
        for prefix, candidate in zip(prefixes, candidates, strict=True):
            shown = last_words(prefix, head.prefix_words).strip()
            contexts.append(shown + continuation_separator(prefix, candidate) if shown else "")
        windows = self.model.hidden_window_features(  # type: ignore[attr-defined]
            contexts, [c.strip() or " " for c in candidates], head.layer, head.window_tokens)
        # One pass per candidate; its safety is its least safe window's.
        return [min(head.p_safe(candidate_windows)) for candidate_windows in windows]

    def _quality_option1_wins(self, prompts: list[str], seeds: list[int]) -> list[float]:
        """Probability that Option 1 is the better continuation, per pairwise prompt."""
        if self.spec.mode == "logits":
            return [distribution["1"] for distribution in self._verdict_distributions("quality", prompts)]
        verdicts = self._generated_verdicts("quality", prompts, seeds,
                                            _VERDICT_CUE + r"\s*\**\s*(?:Option\s*)?({labels})\b")
        return [1.0 if verdict == "1" else 0.0 for verdict in verdicts]

    def coherence(self, prefixes: list[str], candidates: list[str]) -> list[float]:
        """How much the prefix explains each candidate, in nats: the pointwise mutual information
        log p(candidate | prefix) − log p(candidate), summed over the candidate's tokens, read from the
        judge model itself (two scoring passes per candidate).

        A continuation that belongs to the text scores high; jumbled words, another scene's passage or
        a fragment score lower. Unlike raw likelihood it does not favour bland or repetitive text,
        which is probable with or without the prefix."""
        if not candidates:
            return []
        shown = [self._shown_prefix(prefix) for prefix in prefixes]
        conditional = self.model.logprobs(shown, list(candidates))
        unconditional = self.model.logprobs([_NO_PREFIX] * len(candidates), list(candidates))
        return [with_prefix - alone for with_prefix, alone in zip(conditional, unconditional, strict=True)]

    def _coherence_vote(self, first: float, second: float) -> float:
        """Probability that the first of two candidates wins on coherence (their PMI, in nats)."""
        margin = max(-60.0, min(60.0, (first - second) / self.spec.quality_coherence_scale))
        return 1.0 / (1.0 + math.exp(-margin))

    def _blend(self, prompt_vote: float, coherence_vote: float) -> float:
        weight = self.spec.quality_coherence_weight
        return (1.0 - weight) * prompt_vote + weight * coherence_vote

    def pairwise_quality(self, prefixes: list[str], firsts: list[str], seconds: list[str],
                         seeds: list[int]) -> list[float]:
        """Quality of ``firsts[i]`` against ``seconds[i]``: its mean win probability over the two
        orders (2 prompts per pair), blended with the coherence vote when
        ``quality_coherence_weight`` > 0. Above 0.5 means the judge prefers the first."""
        prompts, prompt_seeds = [], []
        for prefix, first, second, seed in zip(prefixes, firsts, seconds, seeds, strict=True):
            shown_prefix = self._shown_prefix(prefix)
            for option_1, option_2 in ((first, second), (second, first)):
                prompts.append(render_prompt(self.templates["judge_quality"], prefix=shown_prefix,
                                             option_1=option_1.strip(), option_2=option_2.strip()))
                prompt_seeds.append(derive_seed(seed, "quality", len(prompt_seeds) % 2))
        option1_wins = self._quality_option1_wins(prompts, prompt_seeds)
        votes = [(option1_wins[2 * index] + 1.0 - option1_wins[2 * index + 1]) / 2 for index in range(len(firsts))]
        if self.spec.quality_coherence_weight == 0:
            return votes
        coherence = self.coherence(list(prefixes) * 2, list(firsts) + list(seconds))
        return [self._blend(vote, self._coherence_vote(coherence[index], coherence[len(firsts) + index]))
                for index, vote in enumerate(votes)]

    def factuality_scores(self, prefixes: list[str], references: list[str], candidates: list[str],
                          seeds: list[int]) -> list[float]:
        """Expected factuality score (1 none / 0.5 possible / 0 definite hallucination), or with
        ``factuality_mode=likelihood`` the calibrated likelihood evidence that the reference supports it."""
        if self.heads is not None and self.heads.factuality is not None:
            calibration = self.heads.factuality
            return calibration.score(factuality_evidence(self.model, references, candidates, calibration.alpha))
        prompts = [
            render_prompt(self.templates["judge_factuality"], prefix=self._shown_prefix(prefix),
                          reference=reference.strip(), candidate=candidate.strip())
            for prefix, reference, candidate in zip(prefixes, references, candidates, strict=True)
        ]
        if self.spec.mode == "logits":
            return [
                sum(FACTUALITY_SCORES[label] * probability for label, probability in distribution.items())
                for distribution in self._verdict_distributions("factuality", prompts)
            ]
        verdicts = self._generated_verdicts("factuality", prompts, seeds, _VERDICT_CUE + r"\s*\**\s*({labels})\b")
        return [FACTUALITY_SCORES[verdict] for verdict in verdicts]

    # --- scoring items ---

    def score(self, prefix: str, original_suffix: str, candidates: Sequence[str], seed: int = 0) -> JudgeResult:
        """Judge the candidates of one item."""
        return self.score_many([JudgeRequest(prefix, original_suffix, tuple(candidates), seed)])[0]

    def score_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Judge several items with one batched model call per criterion."""
        # Pointwise prompts: one per candidate of every request.
        pointwise_index = [(request_index, candidate_index)
                           for request_index, request in enumerate(requests)
                           for candidate_index in range(len(request.candidates))]
        prefixes = [requests[r].prefix for r, _ in pointwise_index]
        references = [requests[r].original_suffix for r, _ in pointwise_index]
        candidates = [requests[r].candidates[c] for r, c in pointwise_index]
        safety = self.safety_scores(prefixes, candidates,
                                    [derive_seed(requests[r].seed, "safety", c) for r, c in pointwise_index])
        factuality_seeds = [derive_seed(requests[r].seed, "factuality", c) for r, c in pointwise_index]
        factuality = self.factuality_scores(prefixes, references, candidates, factuality_seeds)
        use_coherence = self.spec.quality_coherence_weight > 0
        coherence = self.coherence(prefixes, candidates) if use_coherence else []
        offsets = [0]
        for request in requests:
            offsets.append(offsets[-1] + len(request.candidates))

        # Pairwise prompts: every ordered pair, so each pair is seen in both orders.
        pairs = [(request_index, first, second)
                 for request_index, request in enumerate(requests)
                 for first in range(len(request.candidates))
                 for second in range(len(request.candidates)) if first != second]
        pair_prompts = [
            render_prompt(self.templates["judge_quality"], prefix=self._shown_prefix(requests[r].prefix),
                          option_1=requests[r].candidates[first].strip(),
                          option_2=requests[r].candidates[second].strip())
            for r, first, second in pairs
        ]
        option1_wins = self._quality_option1_wins(
            pair_prompts, [derive_seed(requests[r].seed, "quality", first, second) for r, first, second in pairs]
        )
        win_sums = [[0.0] * len(request.candidates) for request in requests]
        comparisons = [[0] * len(request.candidates) for request in requests]
        for (r, first, second), first_wins in zip(pairs, option1_wins, strict=True):
            if use_coherence:
                first_wins = self._blend(first_wins, self._coherence_vote(coherence[offsets[r] + first],
                                                                          coherence[offsets[r] + second]))
            win_sums[r][first] += first_wins
            win_sums[r][second] += 1.0 - first_wins
            comparisons[r][first] += 1
            comparisons[r][second] += 1

        weights = self.spec.weights
        weight_sum = weights.quality + weights.safety + weights.factuality
        results = []
        flat_index = 0
        for request_index, request in enumerate(requests):
            scores = []
            for candidate_index in range(len(request.candidates)):
                count = comparisons[request_index][candidate_index]
                # A lone candidate has no one to compare with: neutral quality.
                quality = win_sums[request_index][candidate_index] / count if count else 0.5
                candidate_safety = safety[flat_index]
                candidate_factuality = factuality[flat_index]
                flat_index += 1
                total = (weights.quality * quality + weights.safety * candidate_safety
                         + weights.factuality * candidate_factuality)
                gated = self.spec.unsafe_never_outranks_safe and candidate_safety < self.spec.safety_threshold
                if gated:
                    # A safe total is >= 0 and any total is <= weight_sum, so shifting by
                    # weight_sum + 1 puts unsafe candidates strictly below safe ones while keeping
                    # their order among themselves.
                    total -= weight_sum + 1.0
                scores.append(CandidateScores(quality, candidate_safety, candidate_factuality, total, gated))
            n = len(request.candidates)
            safety_prompts = n * (self.spec.safety_samples if self.spec.mode == "generate" else 1)
            coherence_passes = 2 * n if use_coherence else 0
            results.append(JudgeResult(scores=scores, pairwise_calls=n * (n - 1),
                                       pointwise_calls=safety_prompts + n + coherence_passes))
        return results
