"""``vllm`` backend: GPU rollouts with vLLM's offline ``LLM`` engine and in-place weight reload.

- Seeding: every request gets its own ``SamplingParams(seed=...)``, which vLLM applies per request,
  so output i depends only on prompt i, seed i and the weights, as the protocol requires (the
  tokens can differ from the ``hf`` backend's: other kernels, other sampler).
- Prompts are tokenized here exactly as the ``hf`` backend does (leading special tokens kept,
  text truncated from the left) and passed as token ids.
- Weight reload: vLLM is started with :class:`WeightReloadExtension` mixed into its workers
  (``worker_extension_cls``); :meth:`VLLMModel.load_weights` checks the sha256 and then asks every
  worker, via ``collective_rpc``, to stream the safetensors file into its model with the model's own
  ``load_weights`` (which handles fused and sharded parameters), then drops the prefix cache, whose
  KV entries were computed with the old weights. No process restart, no pickled tensors.

vLLM is imported when a :class:`VLLMModel` is built; it is an optional extra (``sipstream[vllm]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from sipstream.config.models import ModelSpec
from sipstream.models.base import (
    ModelNotAvailableError,
    WeightsMismatchError,
    distinguishing_tokens,
    fetch_weights_file,
)
from sipstream.models.sources import resolve_source

log = logging.getLogger(__name__)

#: vLLM's default ``max_logprobs``: alternatives per position we may ask for.
TOP_LOGPROBS = 20


class WeightReloadExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); runs inside the worker process."""

    def sipstream_load_weights(self, local_path: str) -> int:
        """Load every tensor of a safetensors file into this worker's model; returns the count."""
        from safetensors import safe_open

        model = self.model_runner.model  # type: ignore[attr-defined]  # provided by the vLLM worker

        def tensors():
            # One tensor at a time: a 1.4B checkpoint never sits in host memory twice.
            with safe_open(local_path, framework="pt", device="cpu") as file:
                for name in file.keys():
                    yield name, file.get_tensor(name)

        loaded = model.load_weights(weights=tensors())
        return len(loaded) if loaded is not None else -1


class VLLMModel:
    """A causal LM served in-process by vLLM, as a :class:`~sipstream.models.base.TextModel`."""

    def __init__(self, spec: ModelSpec) -> None:
        try:
            import torch
            from vllm import LLM
        except ImportError as error:
            raise ModelNotAvailableError(
                f"backend 'vllm' needs vLLM and a CUDA GPU: pip install 'sipstream[vllm]' ({error})"
            ) from error
        if not torch.cuda.is_available():
            raise ModelNotAvailableError("backend 'vllm' needs a CUDA GPU; on CPU use backend 'hf'")

        self.spec = spec
        self.weights_version: str | None = None
        model_path = resolve_source(spec.source, spec.cache_dir, seed=spec.seed)
        self.llm = LLM(
            model=model_path,
            dtype="bfloat16" if spec.dtype == "auto" else spec.dtype,
            seed=spec.seed,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            max_model_len=spec.max_prompt_tokens + 512,
            max_logprobs=TOP_LOGPROBS,
            enable_prefix_caching=True,  # rollouts of one prefix share its KV cache
            worker_extension_cls=f"{__name__}.WeightReloadExtension",
        )
        self.tokenizer = self.llm.get_tokenizer()
        with_specials = self.tokenizer("a")["input_ids"]
        without_specials = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        self.leading_special_ids = list(with_specials[: len(with_specials) - len(without_specials)])
        start_id = self.tokenizer.bos_token_id
        if start_id is None:
            start_id = self.tokenizer.eos_token_id
        self.empty_prompt_ids = [] if self.leading_special_ids else [start_id if start_id is not None else 0]

    # --- tokens (same rules as the hf backend) ---

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        budget = self.spec.max_prompt_tokens - reserve - len(self.leading_special_ids)
        ids = self.leading_special_ids + self.encode(prompt)[-budget:]
        return ids if ids else list(self.empty_prompt_ids)

    def _token_prompts(self, id_rows: list[list[int]]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=ids) for ids in id_rows]

    # --- TextModel ---

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        seeds: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        from vllm import SamplingParams

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        if max_new_tokens < 1:
            return ["" for _ in prompts]
        params = [
            SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=int(seed) % (2**63), skip_special_tokens=True)
            for seed in seeds
        ]
        requests = self._token_prompts([self.prompt_ids(prompt, reserve=max_new_tokens) for prompt in prompts])
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        from vllm import SamplingParams

        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        continuation_rows = [self.encode(text) for text in continuations]
        rows = [self.prompt_ids(prompt, reserve=len(continuation)) + continuation
                for prompt, continuation in zip(prompts, continuation_rows, strict=True)]
        # prompt_logprobs=0 returns the log-prob of each actual prompt token; one generated token
        # is the minimum vLLM produces and is ignored.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(self._token_prompts(rows), sampling_params=params, use_tqdm=False)
        totals = []
        for row, continuation, output in zip(rows, continuation_rows, outputs, strict=True):
            total = 0.0
            for position in range(len(row) - len(continuation), len(row)):
                total += output.prompt_logprobs[position][row[position]].logprob
            totals.append(total)
        return totals

    def next_token_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        from vllm import SamplingParams

        shared_ids, option_ids = distinguishing_tokens([self.encode(option) for option in options])
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS)
        rows = [self.prompt_ids(prompt, reserve=len(shared_ids)) + shared_ids for prompt in prompts]
        outputs = self.llm.generate(self._token_prompts(rows), sampling_params=params, use_tqdm=False)
        rows = []
        for output in outputs:
            alternatives = output.outputs[0].logprobs[0]  # token id -> Logprob, top-k plus the sampled one
            rows.append([alternatives[token_id].logprob if token_id in alternatives else -math.inf
                         for token_id in option_ids])
        return rows

    def load_weights(self, path_or_uri: str, sha256: str, version: str | None = None) -> None:
        # The sha256 is checked before any worker sees the file.
        local_path = fetch_weights_file(path_or_uri, sha256)
        try:
            self.llm.collective_rpc("sipstream_load_weights", args=(str(local_path),))
        except Exception as error:  # a worker's failure arrives wrapped; say what was being loaded
            # Unlike the hf backend, workers stream tensors in, so a file that fails half-way may
            # leave mixed weights: the caller must reload the last good version.
            raise WeightsMismatchError(
                f"vLLM workers failed to load {path_or_uri} ({error}); weights may be partly updated, "
                f"reload version {self.weights_version}"
            ) from error
        self.llm.reset_prefix_cache()
        self.weights_version = version if version is not None else sha256[:12]
        log.info("vLLM loaded weights %s (version %s)", path_or_uri, self.weights_version)
