"""Judge: items/s, logit-scored against generative verdicts, on the same items and model.

Each item has the candidates the judge sees in the embedded default: the original suffix and
`rollouts` others (here the suffixes of neighbouring items stand in for rollouts: judging cost depends
on text length, not on who wrote it). Both modes ask the same questions — safety and factuality per
candidate, quality for every ordered pair — through `sipstream.models.Judge`:

- ``logits``: one forward pass per prompt reads the verdict token's probability (`Judge.score_many`);
- ``generate``: the judge writes up to `verdict_max_new_tokens` tokens per prompt, safety sampled
  `safety_samples` times (the paper's 5), and the verdict is parsed. A small judge often writes no
  parsable verdict (the stage would dead-letter such an item): each criterion is timed in full anyway
  and the share of parsable answers is reported.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.context import Context
from benchmarks.measure import Section

TITLE = "Judge: logit-scored vs generative"


class RecordingModel:
    """The judge's real model, keeping every generated answer so its verdicts can be counted."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.answers: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        answers = self.model.generate(*args, **kwargs)
        self.answers.extend(answers)
        return answers


def judge_requests(cfg: Any, count: int) -> list[Any]:
    from benchmarks.bench_rollout import rollout_items
    from sipstream.models import JudgeRequest

    k = cfg.rollout.rollouts
    items = rollout_items(cfg, count + k)
    return [JudgeRequest(item["prefix"], item["suffix"],
                         (item["suffix"], *(other["suffix"] for other in items[i + 1:i + 1 + k])), item["seed"])
            for i, item in enumerate(items[:count])]


def generative_pass(judge: Any, requests: list[Any]) -> dict[str, Any]:
    """Every generative question of `requests`, criterion by criterion; an unparsable verdict ends only
    its criterion's call (after all of its answers were generated), so the time is the full cost."""
    from sipstream.models.judge import JudgeVerdictError

    point = [(r, c) for r in requests for c in r.candidates]
    pairs = [(r, a, b) for r in requests for i, a in enumerate(r.candidates) for b in r.candidates[i + 1:]]
    calls = {
        "safety": lambda: judge.safety_scores([r.prefix for r, _ in point], [c for _, c in point],
                                              [r.seed for r, _ in point]),
        "factuality": lambda: judge.factuality_scores([r.prefix for r, _ in point], [r.original_suffix for r, _ in point],
                                                      [c for _, c in point], [r.seed for r, _ in point]),
        "quality": lambda: judge.pairwise_quality([r.prefix for r, _, _ in pairs], [a for _, a, _ in pairs],
                                                  [b for _, _, b in pairs], [r.seed for r, _, _ in pairs]),
    }
    unparsable = []
    started = time.perf_counter()
    for name, call in calls.items():
        try:
            call()
        except JudgeVerdictError:
            unparsable.append(name)
    return {"seconds": time.perf_counter() - started, "unparsable_criteria": unparsable}


def parsed_share(judge: Any, answers: list[str], counts: dict[str, int]) -> float:
    """Share of answers with a readable verdict, each parsed with its criterion's labels and cue."""
    from sipstream.models.judge import _VERDICT_CUE, parse_verdict

    patterns = {"safety": _VERDICT_CUE + r"\s*\**\s*({labels})\b", "factuality": _VERDICT_CUE + r"\s*\**\s*({labels})\b",
                "quality": _VERDICT_CUE + r"\s*\**\s*(?:Option\s*)?({labels})\b"}
    parsed, position = 0, 0
    for criterion in ("safety", "factuality", "quality"):
        labels = list(judge.verdict_forms[criterion])
        for answer in answers[position:position + counts[criterion]]:
            parsed += parse_verdict(answer, labels, patterns[criterion]) is not None
        position += counts[criterion]
    return parsed / max(1, len(answers))


def run(ctx: Context) -> Section:
    from sipstream.models import Judge
    from sipstream.stages.models import shared_model

    cfg = ctx.config()
    n_items, max_new, repeats = (4, 4, 1) if ctx.quick else (2, 16, 2)
    requests = judge_requests(cfg, n_items)
    n = len(requests[0].candidates)
    model = RecordingModel(shared_model(cfg.models.judge))
    logit_judge = Judge(model, cfg.judge)
    gen_spec = cfg.judge.model_copy(update={"mode": "generate", "verdict_max_new_tokens": max_new})
    gen_judge = Judge(model, gen_spec)
    samples = gen_spec.safety_samples
    section = Section(TITLE, (
        f"judge {cfg.models.judge.source}, {n_items} items × {n} candidates (original + {n - 1} stand-in rollouts); "
        f"logits: {n} safety + {n} factuality + {n * (n - 1)} pairwise prompts per item; generate: {n * samples} "
        f"safety ({samples} samples) + {n} factuality + {n * (n - 1)} pairwise answers of ≤ {max_new} tokens; "
        f"one warm-up item each, then logit and generative passes interleaved, best of {repeats}"))

    logit_judge.score_many(requests[:1])
    generative_pass(gen_judge, requests[:1])
    logit_s, gen_s, gen_result = float("inf"), float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        logit_judge.score_many(requests)
        logit_s = min(logit_s, time.perf_counter() - started)
        model.answers.clear()
        result = generative_pass(gen_judge, requests)
        if result["seconds"] < gen_s:
            gen_s, gen_result, answers = result["seconds"], result, list(model.answers)
    assert gen_result is not None
    counts = {"safety": n_items * n * samples, "factuality": n_items * n, "quality": n_items * n * (n - 1)}
    logit_prompts = n_items * (2 * n + n * (n - 1))
    section.metric("logit_items_per_s", "logit-scored items/s", n_items / logit_s, "items/s")
    section.metric("generate_items_per_s", "generative items/s", n_items / gen_s, "items/s")
    section.metric("logit_over_generate", "logit / generative items/s", gen_s / logit_s, "×")
    section.metric("logit_prompts_per_s", "logit-scored prompts/s", logit_prompts / logit_s, "prompts/s")
    section.metric("generate_answers_per_s", "generative answers/s", sum(counts.values()) / gen_s, "answers/s")
    section.info["generative answers with a parsable verdict"] = f"{parsed_share(gen_judge, answers, counts):.0%}"
    section.info["criteria whose batch had an unparsable verdict"] = ", ".join(gen_result["unparsable_criteria"]) or "none"
    section.notes.append(
        f"Logit scoring reads one next-token distribution per prompt; a generative verdict decodes up to {max_new} "
        f"tokens per answer and samples safety {samples} times, so it asks {sum(counts.values()) / n_items:.0f} "
        f"questions per item instead of {logit_prompts / n_items:.0f}. A large judge that reasons before its verdict "
        "writes far more than this cap (`verdict_max_new_tokens` defaults to 256): on CPU only logit scoring is "
        "affordable, which is why it is the default.")
    return section
