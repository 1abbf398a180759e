"""The split stage: cut a document into items (prefix, original suffix).

The document is tokenized with the policy's tokenizer and cut into contiguous chunks of
`suffix_tokens` tokens; each chunk is an item's original suffix and everything before it its prefix,
cut from the left so prefix + suffix fit `max_context_tokens` (the paper: 128 and 2048). Text goes on
the bus, not token ids, so any tokenizer can re-derive them. `item_id` is `doc_id:chunk_index`, and the
seed is derived from the run's seed and the item id: re-ingesting a document gives the same items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sipstream.bus import topics as T
from sipstream.bus.records import Document, Prefix
from sipstream.bus.runner import Stage
from sipstream.config import Config, ItemsConfig
from sipstream.errors import UserError
from sipstream.models.base import derive_seed
from sipstream.models.sources import resolve_source


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Chunk:
    chunk_index: int
    prefix_ids: list[int]
    suffix_ids: list[int]


def cut_document(token_ids: list[int], items: ItemsConfig) -> list[Chunk]:
    """Contiguous suffix chunks with their (left-truncated) prefixes, as the paper cuts documents."""
    size = items.suffix_tokens
    max_prefix = items.max_context_tokens - size
    chunks: list[Chunk] = []
    for index, start in enumerate(range(0, len(token_ids), size)):
        suffix = token_ids[start : start + size]
        if len(suffix) < items.min_suffix_tokens:
            break  # a short tail: too little text for rollouts of comparable length
        if start < items.min_prefix_tokens:
            continue
        chunks.append(Chunk(index, token_ids[max(0, start - max_prefix) : start], suffix))
        if items.max_items_per_document is not None and len(chunks) >= items.max_items_per_document:
            break
    return chunks


def item_seed(run_seed: int, item_id: str) -> int:

    return derive_seed(run_seed, item_id) % (2**31)


class SplitStage(Stage[Document, Prefix]):
    name = "split"
    input_topic = T.DOCUMENTS
    output_topic = T.PREFIXES

    def __init__(self, tokenizer: Tokenizer, items: ItemsConfig, run_seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.items = items
        self.run_seed = run_seed

    def process(self, item: Document) -> list[Prefix]:
        ids = self.tokenizer.encode(item["text"])
        out = []
        for chunk in cut_document(ids, self.items):
            item_id = f"{item['doc_id']}:{chunk.chunk_index}"
            out.append(
                Prefix(
                    item_id=item_id,
                    doc_id=item["doc_id"],
                    chunk_index=chunk.chunk_index,
                    prefix=self.tokenizer.decode(chunk.prefix_ids),
                    suffix=self.tokenizer.decode(chunk.suffix_ids),
                    seed=item_seed(self.run_seed, item_id),
                )
            )
        # Whitespace-only suffixes (e.g. trailing blank lines) make no useful item.
        return [o for o in out if o["suffix"].strip()]


def load_tokenizer(cfg: Config) -> Tokenizer:
    """The policy's tokenizer alone (no weights), so a split worker stays light."""
    from transformers import AutoTokenizer


    spec = cfg.models.policy
    if spec.backend == "openai":
        if spec.tokenizer is None:

            raise UserError("split needs a local tokenizer: set models.policy.tokenizer for the openai backend")
        source = spec.tokenizer
    else:
        source = spec.source
    tok = AutoTokenizer.from_pretrained(resolve_source(source, spec.cache_dir, spec.seed))

    class _Plain:
        def encode(self, text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False)

        def decode(self, token_ids: list[int]) -> str:
            return tok.decode(token_ids, skip_special_tokens=True)

    return _Plain()


def build(cfg: Config) -> SplitStage:
    return SplitStage(load_tokenizer(cfg), cfg.items, cfg.seed)
