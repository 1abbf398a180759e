"""The held-out prompts and texts each metric runs on, built deterministically from the shipped data.

Everything here comes from the held-out splits of :mod:`sipstream.eval.heldout`, in a fixed order
(round-robin over documents / categories, so a small set still covers every book and attribute), and
is independent of any tokenizer: the same prompts are given to every model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from sipstream.data import load_heldout
from sipstream.errors import UserError
from sipstream.eval.heldout import heldout_corpus, heldout_probes

T = TypeVar("T")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Prompt:
    """A prefix to continue; ``reference`` is the original text that followed it (win-rate prompts)."""

    prompt_id: str
    prefix: str
    reference: str = ""


@dataclass(frozen=True)
class FactPair:
    """A true statement and its minimally edited false twin."""

    probe_id: str
    category: str
    true: str
    false: str


def round_robin(records: Iterable[T], group: Callable[[T], str]) -> list[T]:
    """Records interleaved across groups (first of each group in order of first appearance, then the
    second of each, ...), so that any leading slice covers as many groups as it can."""
    groups: dict[str, list[T]] = {}
    for record in records:
        groups.setdefault(group(record), []).append(record)
    out: list[T] = []
    queues = list(groups.values())
    for depth in range(max((len(queue) for queue in queues), default=0)):
        out.extend(queue[depth] for queue in queues if depth < len(queue))
    return out


def _take(records: list[T], n: int, what: str) -> list[T]:
    if n > len(records):
        raise UserError(f"eval asks for {n} {what}, the held-out set has {len(records)}; lower eval.{what}")
    return records[:n]


def document_cuts(doc_id: str, text: str, prefix_words: int, suffix_words: int) -> list[Prompt]:
    """Non-overlapping (prefix, original suffix) cuts of one document, in order.

    The prefix is ``prefix_words`` words of the literal text (spacing and paragraphs kept); the
    reference is the text after it up to ``suffix_words`` more words, starting with the whitespace
    that followed the prefix, so prefix + reference is a verbatim slice of the document."""
    spans = [match.span() for match in _WORD.finditer(text)]
    cuts: list[Prompt] = []
    start = 0
    while start + prefix_words + suffix_words <= len(spans):
        prefix_end = spans[start + prefix_words - 1][1]
        suffix_end = spans[start + prefix_words + suffix_words - 1][1]
        cuts.append(Prompt(f"{doc_id}@{start}", text[spans[start][0]:prefix_end], text[prefix_end:suffix_end]))
        start += prefix_words + suffix_words
    return cuts


def winrate_prompts(n: int, prefix_words: int, suffix_words: int) -> list[Prompt]:
    """``n`` clean held-out prefixes with their original suffixes, spread over the held-out documents."""

    cuts = [cut for doc in heldout_corpus()
            for cut in document_cuts(doc["doc_id"], doc["text"], prefix_words, suffix_words)]
    return _take(round_robin(cuts, lambda cut: cut.prompt_id.rsplit("@", 1)[0]), n, "winrate_prompts")


def safety_prompts(n: int) -> list[Prompt]:
    """``n`` held-out unsafe-leaning prefixes (RealToxicityPrompts), spread over its attributes."""

    probes = round_robin(heldout_probes("toxicity_prompts"), lambda probe: probe["category"])
    return [Prompt(probe["probe_id"], probe["text"]) for probe in _take(probes, n, "safety_prompts")]


def fact_pairs(n: int) -> list[FactPair]:
    """``n`` true/false minimal pairs on held-out false claims, spread over their categories."""

    pairs = round_robin(load_heldout("factuality_pairs"), lambda pair: pair["category"])
    return [FactPair(p["probe_id"], p["category"], p["true"], p["false"])
            for p in _take(pairs, n, "factuality_pairs")]


def perplexity_texts(n: int) -> list[tuple[str, str]]:
    """``n`` held-out corpus documents as (doc_id, text), alternating between authors."""

    docs = round_robin(heldout_corpus(), lambda doc: str(doc.get("meta", {}).get("author")))
    return [(doc["doc_id"], doc["text"]) for doc in _take(docs, n, "perplexity_docs")]
