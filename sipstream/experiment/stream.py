"""The experiment's stream: the documents of a seed (with known bad passages), scoring them through the
stages once (shared mode), and what the scored stream held (chosen candidates by kind, curriculum)."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sipstream.bus import topics as T
from sipstream.bus.fetch import RecordFetcher
from sipstream.bus.runner import StageRunner
from sipstream.errors import UserError
from sipstream.eval.heldout import training_corpus, training_probes
from sipstream.experiment.config import ExperimentConfig
from sipstream.ops.ingest import produce_documents
from sipstream.runs.manifest import read_ends
from sipstream.stages import build_stage

#: Toxicity categories whose prompts read as unsafe text to imitate (flirtation and the like are mild).
UNSAFE_CATEGORIES = ("insult", "profanity", "severe_toxicity", "threat", "identity_attack")


def _insert(text: str, passage: str, after_words: int) -> str:
    """`passage` as a paragraph of its own at the first sentence end after `after_words` words."""
    words = 0
    for index, char in enumerate(text):
        if char.isspace() and index and not text[index - 1].isspace():
            words += 1
        if words >= after_words and char in ".!?" and index + 1 < len(text) and text[index + 1].isspace():
            return f"{text[: index + 1]}\n\n{passage}\n\n{text[index + 1:].lstrip()}"
    return f"{text}\n\n{passage}"

def mixed_documents(exp: ExperimentConfig, seed: int) -> list[dict]:
    """The seed's documents: training-split corpus excerpts, a known share of them with a bad passage.

    Each document's `meta.injected` says what was put in ("unsafe", "false" or None) and from which
    probe ids, so the stream's composition can be counted downstream."""

    rng = random.Random(seed)
    corpus = training_corpus()
    if exp.documents > len(corpus):
        raise UserError(f"documents={exp.documents} but the training corpus has {len(corpus)}")
    chosen = rng.sample(corpus, exp.documents)
    unsafe = [p for p in training_probes("toxicity_prompts") if p["category"] in UNSAFE_CATEGORIES]
    false = training_probes("false_claims")
    rng.shuffle(unsafe)
    rng.shuffle(false)
    n_unsafe = round(exp.unsafe_fraction * exp.documents)
    n_false = round(exp.false_fraction * exp.documents)
    kinds = ["unsafe"] * n_unsafe + ["false"] * n_false + [None] * (exp.documents - n_unsafe - n_false)
    rng.shuffle(kinds)
    out = []
    for doc, kind in zip(chosen, kinds, strict=True):
        doc = json.loads(json.dumps(doc))
        picked: list[dict] = []
        if kind == "unsafe":
            picked = [unsafe.pop() for _ in range(2)]
        elif kind == "false":
            picked = [false.pop() for _ in range(3)]
        if picked:
            doc["text"] = _insert(doc["text"], " ".join(p["text"] for p in picked), exp.insert_after_words)
        doc["doc_id"] = f"{doc['doc_id']}-s{seed}"
        doc.setdefault("meta", {})["injected"] = kind
        doc["meta"]["injected_from"] = [p["probe_id"] for p in picked]
        out.append(doc)
    return out


# --------------------------------------------------------------------------- scoring it once (shared mode)


def _stage(name: str, cfg: Any, bootstrap: str, expect: int) -> dict[str, float]:

    stats = StageRunner(build_stage(name, cfg), cfg, bootstrap).run(until=lambda s: s.counters["consumed"] >= expect)
    return dict(stats.counters)

def score_stream(cfg: Any, bootstrap: str, documents: list[dict], log: Any) -> dict[str, Any]:
    """split → rewrite → rollout → judge → assemble, each stage run until it consumed its input."""

    T.create_topics(cfg.bus, bootstrap, T.load_specs(T.topics_dir(cfg.bus)))
    produce_documents(cfg.bus, bootstrap, documents)
    counters = {"split": _stage("split", cfg, bootstrap, len(documents))}
    items = int(counters["split"].get("produced", 0))
    for name in ("rewrite", "rollout", "judge", "assemble"):
        started = time.monotonic()
        counters[name] = _stage(name, cfg, bootstrap, items)
        log.info("stage done", stage=name, items=items, seconds=round(time.monotonic() - started, 1))
    ends = read_ends(bootstrap, cfg.bus, [T.PAIRS])[T.PAIRS]
    return {"items": items, "counters": counters, "pairs_ranges": {int(p): [int(lo), int(hi)] for p, (lo, hi) in ends.items()}}

def read_pairs(cfg: Any, bootstrap: str, ranges: dict[int, list[int]]) -> list[dict]:

    fetcher = RecordFetcher(cfg.bus, bootstrap, cfg.bus.topic(T.PAIRS))
    try:
        return [json.loads(m.value()) for p, (lo, hi) in sorted(ranges.items()) for m in fetcher.read_range(p, lo, hi)]
    finally:
        fetcher.close()


# --------------------------------------------------------------------------- what it held


def stream_summary(pairs: list[dict], documents: list[dict]) -> dict[str, Any]:
    """What the stream held: chosen candidates by kind (all, and for items of bad documents)."""
    injected = {d["doc_id"]: d["meta"]["injected"] for d in documents}
    chosen: Counter[str] = Counter()
    chosen_bad: Counter[str] = Counter()
    order: list[str | None] = []
    for pair in pairs:
        kind = (pair.get("chosen") or {}).get("kind")
        order.append(kind)
        if kind:
            chosen[kind] += 1
            if injected.get(pair["doc_id"]):
                chosen_bad[kind] += 1
    return {"pairs": len(pairs), "with_pair": sum(1 for k in order if k), "chosen_by_kind": dict(chosen),
            "chosen_by_kind_in_bad_documents": dict(chosen_bad), "chosen_kind_sequence": order,
            "documents_by_injection": dict(Counter(str(d["meta"]["injected"]) for d in documents))}

def curriculum_by_position(kinds: list[str | None], buckets: int = 4) -> dict[str, dict[str, float]]:
    """Share of chosen kinds in consecutive quarters of the stream (shared mode: rollouts never change)."""
    kinds = [k for k in kinds if k]
    if not kinds:
        return {}
    size = max(1, math.ceil(len(kinds) / buckets))
    out = {}
    for b, start in enumerate(range(0, len(kinds), size)):
        part = Counter(kinds[start : start + size])
        total = sum(part.values())
        out[str(b + 1)] = {k: part.get(k, 0) / total for k in ("original", "rewrite", "rollout")}
    return out

def exported_pairs(run_dir: Path) -> list[dict]:
    pairs = []
    for path in sorted((run_dir / "export" / "sip.pairs").glob("*.jsonl")):
        pairs += [json.loads(json.loads(line)["value"]) for line in path.read_text().splitlines() if line.strip()]
    return pairs

def curriculum_by_version(pairs: list[dict]) -> dict[str, dict[str, float]]:
    by_version: dict[int, Counter[str]] = {}
    for pair in pairs:
        kind = (pair.get("chosen") or {}).get("kind")
        if kind:
            by_version.setdefault(int(pair.get("policy_version", 0)), Counter())[kind] += 1
    return {str(v): {k: c.get(k, 0) / sum(c.values()) for k in ("original", "rewrite", "rollout")}
            for v, c in sorted(by_version.items())}
