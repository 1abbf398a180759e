"""transformers backend: CPU or CUDA, batched, seeded per item, weights reloadable in place.

Sampling is our own short loop over the KV cache instead of ``model.generate`` because
``generate`` draws every row from one global RNG: a row's tokens would then depend on which other
rows share its batch. Here each row owns a ``torch.Generator`` seeded with the item's seed and draws
exactly one uniform number per step from it; the token is read off the row's cumulative
distribution with that number (inverse-CDF sampling). A row's output is therefore a function of its
prompt, its seed and the weights only: batching equals one-by-one, up to float rounding that could
move a CDF boundary (not seen in tests; the logits of a padded row differ by ~1e-6).

torch and transformers are imported when an :class:`HFModel` is built, never at module import.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sipstream.config.models import ModelSpec
from sipstream.models.base import (
    WeightsMismatchError,
    distinguishing_tokens,
    read_verified_weights,
    safetensors_views,
)
from sipstream.models.sources import resolve_source

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Most logit values one scoring pass materialises (float32: 128 MiB), whatever the batch size.
_LOGITS_BUDGET = 32 * 1024 * 1024


def _chunks(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


def sample_next_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float,
) -> torch.Tensor:
    """Pick one token per row by inverse-CDF sampling.

    logits: (batch, vocab) float; uniforms: (batch,) in [0, 1), one per row from the row's own
    generator. Returns (batch,) token ids. ``temperature == 0`` is greedy.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (batch, vocab)
    if top_p < 1.0:
        # Nucleus: keep the most probable tokens whose preceding mass is below top_p. A stable sort
        # keeps equal-probability tokens in id order, so the choice is deterministic.
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    else:
        sorted_probs, sorted_ids = probs, None  # any fixed order works for inverse-CDF sampling
    cumulative = sorted_probs.cumsum(dim=-1)  # (batch, vocab)
    targets = uniforms.to(cumulative.device, cumulative.dtype).unsqueeze(-1) * cumulative[:, -1:]
    positions = torch.searchsorted(cumulative, targets, right=True).clamp(max=cumulative.shape[-1] - 1)
    positions = positions.squeeze(-1)
    if sorted_ids is None:
        return positions
    return sorted_ids.gather(-1, positions.unsqueeze(-1)).squeeze(-1)


def continuation_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the masked target tokens, per row.

    logits: (batch, positions, vocab), the prediction for each target position; target_ids and
    target_mask: (batch, positions). Returns (batch,) float32.
    """
    import torch

    # log_softmax in float32: bf16 log-probs lose the small differences DPO feeds on.
    token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * target_mask).sum(dim=-1)


class HFModel:
    """A causal LM from transformers behind the :class:`~sipstream.models.base.TextModel` protocol."""

    def __init__(self, spec: ModelSpec, model: Any = None, tokenizer: Any = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.weights_version: str | None = None
        if spec.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(spec.device)
        if spec.dtype == "auto":
            # bf16 on GPU halves memory and uses tensor cores; CPU bf16 matmuls are slow on most hosts.
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, spec.dtype)

        if model is None or tokenizer is None:
            model_path = resolve_source(spec.source, spec.cache_dir, seed=spec.seed)
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer

        self.eos_token_id: int | None = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.pad_token_id: int = pad_id if pad_id is not None else 0
        # Special tokens the tokenizer puts in front of a text (BOS for Llama and Gemma, none for
        # GPT-2). We encode texts without them and put them back after left-truncation, so a long
        # prefix never loses its BOS.
        with_specials = tokenizer("a")["input_ids"]
        without_specials = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.leading_special_ids: list[int] = list(with_specials[: len(with_specials) - len(without_specials)])
        if not self.leading_special_ids:
            # GPT-2 style models start documents after <|endoftext|>; an empty prompt needs a token.
            start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_token_id
            self.empty_prompt_ids = [start_id if start_id is not None else 0]
        else:
            self.empty_prompt_ids = []

    # --- tokens ---

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        """Token ids of a prompt as the model sees it: leading special tokens, then the text,
        truncated from the left so that it plus ``reserve`` tokens fit ``max_prompt_tokens``."""
        budget = self.spec.max_prompt_tokens - reserve - len(self.leading_special_ids)
        if budget < 1:
            raise ValueError(f"max_prompt_tokens={self.spec.max_prompt_tokens} leaves no room for the prompt")
        text_ids = self.encode(prompt)[-budget:]
        ids = self.leading_special_ids + text_ids
        return ids if ids else list(self.empty_prompt_ids)

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids), each (batch, longest row), on the model's device.

        Left padding puts every row's last token in the last column, so one slice reads all the
        next-token logits; explicit position ids keep a padded row's positions equal to an
        unpadded one's."""
        import torch

        longest = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row_index, row in enumerate(rows):
            input_ids[row_index, longest - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[row_index, longest - len(row):] = 1
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        return input_ids.to(self.device), attention_mask.to(self.device), position_ids.to(self.device)

    # --- sampling ---

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        seeds: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        if max_new_tokens < 1:
            return ["" for _ in prompts]
        token_rows = self.generate_ids(prompts, max_new_tokens, seeds, temperature, top_p)
        return [self.decode(row) for row in token_rows]

    def generate_ids(
        self,
        prompts: list[str],
        max_new_tokens: int,
        seeds: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Like :meth:`generate` but returns the sampled token ids (end-of-sequence excluded)."""
        outputs: list[list[int]] = []
        for batch in _chunks(len(prompts), self.spec.batch_size):
            outputs.extend(
                self._generate_batch([prompts[i] for i in batch], max_new_tokens, [seeds[i] for i in batch],
                                     temperature, top_p)
            )
        return outputs

    def _generate_batch(
        self, prompts: list[str], max_new_tokens: int, seeds: list[int], temperature: float, top_p: float
    ) -> list[list[int]]:
        import torch

        rows = [self.prompt_ids(prompt, reserve=max_new_tokens) for prompt in prompts]
        input_ids, attention_mask, position_ids = self._left_padded(rows)
        # One generator per row, on CPU so the draws are identical whatever the device.
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        batch_size = len(rows)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        sampled_columns: list[torch.Tensor] = []
        past_key_values = None
        next_positions = position_ids[:, -1:]
        step_input_ids = input_ids
        step_positions = position_ids
        # Slots of the KV cache written by this step. Passed explicitly: left to infer it, transformers
        # takes a slower mask-building path (measured 2x slower per step on SmolLM2, CPU).
        cache_position = torch.arange(input_ids.shape[1], device=self.device)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                outputs = self.model(
                    input_ids=step_input_ids,
                    attention_mask=attention_mask,
                    position_ids=step_positions,
                    past_key_values=past_key_values,
                    cache_position=cache_position,
                    use_cache=True,
                    logits_to_keep=1,
                )
                past_key_values = outputs.past_key_values
                # Every row draws its uniform even when finished, so a row's stream never depends
                # on when its neighbours stop.
                uniforms = torch.cat([torch.rand(1, generator=generator) for generator in generators])
                next_ids = sample_next_tokens(outputs.logits[:, -1, :], uniforms, temperature, top_p)
                next_ids = next_ids.masked_fill(finished, self.pad_token_id)
                sampled_columns.append(next_ids)
                if self.eos_token_id is not None:
                    finished |= next_ids == self.eos_token_id
                if bool(finished.all()):  # a device sync; cheap next to a forward pass
                    break
                step_input_ids = next_ids.unsqueeze(-1)
                cache_position = cache_position[-1:] + 1
                next_positions = next_positions + 1
                step_positions = next_positions
                attention_mask = torch.cat([attention_mask, torch.ones_like(step_input_ids)], dim=-1)
        sampled = torch.stack(sampled_columns, dim=-1).tolist()  # (batch, steps)
        token_rows = []
        for row in sampled:
            if self.eos_token_id is not None and self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            token_rows.append(row)
        return token_rows

    # --- scoring ---

    def logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        encoded = [self.encode(text)[: self.spec.max_prompt_tokens - 1] for text in continuations]
        results: list[float] = []
        for batch in _chunks(len(prompts), self.spec.batch_size):
            # Logits are (rows, continuation positions, vocabulary): for Gemma's 262k-token vocabulary and
            # 128-token continuations that is 135 MB per row, so rows are taken a few at a time.
            positions = max(len(encoded[i]) for i in batch) + 1
            rows_per_pass = max(1, _LOGITS_BUDGET // (positions * self.vocab_size))
            for start in range(0, len(batch), rows_per_pass):
                part = batch[start:start + rows_per_pass]
                results.extend(self._logprobs_batch([prompts[i] for i in part], [encoded[i] for i in part]))
        return results

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _logprobs_batch(self, prompts: list[str], continuation_rows: list[list[int]]) -> list[float]:
        import torch

        rows = [
            self.prompt_ids(prompt, reserve=len(continuation)) + continuation
            for prompt, continuation in zip(prompts, continuation_rows, strict=True)
        ]
        longest_continuation = max(len(continuation) for continuation in continuation_rows)
        if longest_continuation == 0:
            return [0.0 for _ in prompts]
        input_ids, attention_mask, position_ids = self._left_padded(rows)
        with torch.inference_mode():
            # Left padding aligns every continuation to the right edge, so only the last
            # (longest continuation + 1) positions need logits: (batch, positions, vocab) stays small.
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=longest_continuation + 1,
                use_cache=False,  # one pass: a key/value cache would only cost memory
            ).logits[:, :-1, :]
            target_ids = input_ids[:, -longest_continuation:]
            target_mask = torch.zeros_like(target_ids, dtype=torch.float32)
            for row_index, continuation in enumerate(continuation_rows):
                if continuation:
                    target_mask[row_index, -len(continuation):] = 1.0
            return continuation_logprobs(logits, target_ids, target_mask).tolist()

    def hidden_features(self, prompts: list[str], texts: list[str], layer: int) -> list[list[float]]:
        """Per (prompt, text): the mean over the text's tokens of the hidden state after block ``layer``
        (0 = the embeddings), read with the prompt as context. What a linear head on the model's own
        features (the judge's safety head) needs: one pass, no vocabulary projection beyond one position."""

        return [windows[0] for windows in self.hidden_window_features(prompts, texts, layer, window=0)]

    def hidden_window_features(self, prompts: list[str], texts: list[str], layer: int, window: int,
                               stride: int | None = None) -> list[list[list[float]]]:
        """Like `hidden_features`, but per text the means over windows of ``window`` tokens (every ``stride``,
        default half a window; the last window ends at the text's end), from one pass. ``window`` 0, or a
        text no longer than a window: one mean over the whole text."""
        import torch

        encoded = [self.encode(text)[: self.spec.max_prompt_tokens - 1] or [self.pad_token_id] for text in texts]
        step = stride or max(1, window // 2)
        features: list[list[list[float]]] = []
        for batch in _chunks(len(texts), self.spec.batch_size):
            rows = [self.prompt_ids(prompts[i], reserve=len(encoded[i])) + encoded[i] for i in batch]
            input_ids, attention_mask, position_ids = self._left_padded(rows)
            with torch.inference_mode():
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    logits_to_keep=1, use_cache=False, output_hidden_states=True).hidden_states[layer]
            for row, i in enumerate(batch):
                # Left padding: the text is the last len(encoded[i]) positions of its row.
                text_states = hidden[row, -len(encoded[i]):].float()
                length = text_states.shape[0]
                if window <= 0 or length <= window:
                    features.append([text_states.mean(dim=0).tolist()])
                    continue
                starts = sorted({*range(0, length - window + 1, step), length - window})
                features.append([text_states[s:s + window].mean(dim=0).tolist() for s in starts])
        return features

    def next_token_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        import torch

        shared_ids, option_ids = distinguishing_tokens([self.encode(option) for option in options])
        option_index = torch.tensor(option_ids, device=self.device)
        results: list[list[float]] = []
        for batch in _chunks(len(prompts), self.spec.batch_size):
            rows = [self.prompt_ids(prompts[i], reserve=len(shared_ids)) + shared_ids for i in batch]
            input_ids, attention_mask, position_ids = self._left_padded(rows)
            with torch.inference_mode():
                # logits_to_keep=1: the judge needs only the next-token distribution, which saves
                # the (positions × vocab) projection for every prompt token.
                logits = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
                    use_cache=False,
                ).logits[:, -1, :]
                log_probs = torch.log_softmax(logits.float(), dim=-1)[:, option_index]
            results.extend(log_probs.tolist())
        return results

    # --- weights ---

    def load_weights(self, path_or_uri: str, sha256: str, version: str | None = None) -> None:
        import torch

        # One read: hash the bytes, then view them as tensors without a copy (safetensors only: a pickle
        # from the bus could run code).
        new_tensors = safetensors_views(read_verified_weights(path_or_uri, sha256))
        current = self.model.state_dict()
        unexpected = sorted(set(new_tensors) - set(current))
        if unexpected:
            raise WeightsMismatchError(f"refusing {path_or_uri}: tensors the model does not have: {unexpected[:5]}")
        # Tied weights (lm_head = embeddings) are saved once; a key may be missing only if a tensor
        # sharing its storage is present.
        storage_groups: dict[int, set[str]] = {}
        for name, tensor in current.items():
            storage_groups.setdefault(tensor.data_ptr(), set()).add(name)
        missing = [
            name for name in current
            if name not in new_tensors and not (storage_groups[current[name].data_ptr()] & new_tensors.keys())
        ]
        if missing:
            raise WeightsMismatchError(f"refusing {path_or_uri}: tensors missing from the file: {missing[:5]}")
        wrong_shapes = [
            f"{name} {tuple(tensor.shape)} != {tuple(current[name].shape)}"
            for name, tensor in new_tensors.items()
            if tensor.shape != current[name].shape
        ]
        if wrong_shapes:
            raise WeightsMismatchError(f"refusing {path_or_uri}: shape mismatch: {wrong_shapes[:5]}")
        # Every check passed before the first copy, so a refusal never leaves half-updated weights.
        with torch.no_grad():
            for name, tensor in new_tensors.items():
                current[name].copy_(tensor.to(current[name].dtype))
        self.weights_version = version if version is not None else sha256[:12]
        log.info("loaded weights %s (version %s)", path_or_uri, self.weights_version)
