"""From `sip.pairs` records to token rows, and the log-probability of a continuation given its prefix.

A row is `prefix tokens + continuation tokens`, at most `max_seq_tokens` long; the prefix is cut from
the left (the same `HFModel.prompt_ids` the rollout workers use, so both sides see the same context).
Only continuation tokens are scored: prefix tokens are masked out.

Rows are **left**-padded with explicit position ids, as in the model layer: every continuation then
ends at the right edge, so the forward pass computes vocabulary logits only for the last
(longest continuation + 1) positions (`logits_to_keep`) instead of the whole prefix — on 2,048-token
prefixes with 128-token suffixes that is most of the lm-head cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Example:
    """One trainable record: R token rows (R = 2 for DPO: chosen, rejected; 1 otherwise)."""

    item_id: str
    rows: tuple[tuple[int, ...], ...]
    """R rows of token ids: left-truncated prefix, then the continuation."""
    continuation_lengths: tuple[int, ...]
    """Tokens of each row's continuation (the scored tail of the row)."""
    policy_version: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.rows)


def continuation_texts(pair: dict[str, Any], fields: Sequence[str]) -> list[str] | None:
    """The texts an algorithm trains on (`chosen`/`rejected`/`target` are candidates, `suffix` is text);
    None when one is missing (an exact tie has no DPO pair; nothing passed the NLL threshold)."""
    texts = []
    for name in fields:
        value = pair.get(name)
        if value is None:
            return None
        texts.append(value if isinstance(value, str) else value["text"])
    return texts


def encode_example(tokenizer: Any, pair: dict[str, Any], texts: Sequence[str], max_seq_tokens: int) -> Example:
    """Tokenize one pair. `tokenizer` is an `HFModel` whose `max_prompt_tokens` is `max_seq_tokens`."""
    # Room for at least one prefix token (or the start token an empty prefix gets).
    longest_continuation = max(1, max_seq_tokens - 1 - len(tokenizer.leading_special_ids))
    rows, lengths = [], []
    for text in texts:
        continuation = tokenizer.encode(text)[:longest_continuation]
        rows.append(tuple(tokenizer.prompt_ids(pair["prefix"], reserve=len(continuation)) + continuation))
        lengths.append(len(continuation))
    return Example(pair["item_id"], tuple(rows), tuple(lengths), int(pair.get("policy_version", 0)))


def split_by_tokens(examples: Sequence[Example], batch_tokens: int | None) -> list[list[Example]]:
    """Consecutive groups whose padded size (rows × longest row) fits `batch_tokens`; an example
    larger than the budget forms a group of its own. Order is kept, so splitting is deterministic."""
    if batch_tokens is None:
        return [list(examples)] if examples else []
    groups: list[list[Example]] = []
    current: list[Example] = []
    rows = longest = 0
    for example in examples:
        new_rows = rows + len(example.rows)
        new_longest = max(longest, *(len(row) for row in example.rows))
        if current and new_rows * new_longest > batch_tokens:
            groups.append(current)
            current, new_rows, new_longest = [], len(example.rows), max(len(row) for row in example.rows)
        current.append(example)
        rows, longest = new_rows, new_longest
    if current:
        groups.append(current)
    return groups


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (N, longest row); a padded row keeps the
    positions it would have alone."""
    import torch

    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, longest - len(row):] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def sequence_logps(model: Any, examples: Sequence[Example], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of every continuation given its prefix, and the continuation lengths.

    Returns (logps, lengths), each (B, R) for B examples with R rows each; logps is float32 (bf16
    log-probs lose the small differences DPO feeds on) and carries the graph when grad is enabled.
    """
    import torch

    from sipstream.models.hf import continuation_logprobs

    width = len(examples[0].rows)
    rows = [row for example in examples for row in example.rows]  # (N = B·R) rows
    lengths = [n for example in examples for n in example.continuation_lengths]  # (N,)
    scored = max(max(lengths), 1)  # C: positions whose logits we need
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id, device)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=scored + 1,
        use_cache=False,
    ).logits[:, :-1, :]  # (N, C, vocab): the prediction of each of the last C tokens
    target_ids = input_ids[:, -scored:]  # (N, C)
    target_mask = torch.zeros_like(target_ids, dtype=torch.float32)  # (N, C): continuation tokens only
    for index, n in enumerate(lengths):
        if n:
            target_mask[index, -n:] = 1.0
    logps = continuation_logprobs(logits, target_ids, target_mask)  # (N,)
    length_tensor = torch.tensor(lengths, dtype=torch.float32, device=logps.device)
    return logps.view(len(examples), width), length_tensor.view(len(examples), width)
