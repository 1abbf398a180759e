"""``openai`` backend: any OpenAI-compatible completions server (``vllm serve``, ``llama-server``,
hosted APIs) for the judge and the rewriter.

It uses the plain-text ``/v1/completions`` endpoint, not chat, because judge and rewriter prompts are
documents to continue. Each prompt is its own request so each carries its own ``seed`` (the
reproducibility contract: output i depends only on prompt i and seed i); up to ``concurrency``
requests are in flight, and the server batches them. Timeouts, connection errors, 429, 5xx and answers
that are not a completion (garbage JSON from a proxy or a crashed server) are retried with exponential
backoff, at most ``max_retries`` times; then :class:`BackendRequestError` says what happened last, and the
stage runner dead-letters the item with that reason while the stream goes on. Other 4xx answers are bugs
or config errors and fail at once.
The API key is read from the environment variable named by ``api_key_env``, never from config.

What needs server support beyond plain completion:
- :meth:`OpenAIModel.next_token_logprobs` asks for ``logprobs=20`` alternatives of one generated
  token; an option outside the server's top 20 reads as ``-inf`` (vLLM's default
  ``max_logprobs`` is 20; hosted OpenAI models give at most 5).
- :meth:`OpenAIModel.logprobs` needs ``echo`` with ``logprobs`` (vLLM supports it; OpenAI's chat
  models do not). The continuation's tokens are those starting at or after the prompt's last
  character, so a token that straddles the boundary counts as continuation.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sipstream.config.models import ModelSpec
from sipstream.models.base import (
    BackendRequestError,
    ModelError,
    ModelNotAvailableError,
    TokenizerUnavailableError,
)
from sipstream.models.sources import resolve_source

log = logging.getLogger(__name__)

#: Alternatives requested per position when reading verdict probabilities.
TOP_LOGPROBS = 20
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}

T = TypeVar("T")


def _not_a_completion(response: Any) -> str | None:
    """Why a 200 answer is not a completions body (None when it is one): a crashed or misconfigured
    server, or a proxy's error page, must not reach the judge's parser as if it were a verdict."""
    try:
        body = response.json()
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        return f"HTTP 200 with a body that is not JSON ({error}): {response.text[:120]!r}"
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) or "text" not in choices[0]:
        return f"HTTP 200 without completion choices: {response.text[:120]!r}"
    return None


class OpenAIModel:
    """A model behind an OpenAI-compatible HTTP API, as a :class:`~sipstream.models.base.TextModel`."""

    def __init__(self, spec: ModelSpec) -> None:
        import httpx

        self.spec = spec
        self.weights_version: str | None = None
        headers = {}
        if spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise ModelNotAvailableError(
                    f"the openai backend at {spec.base_url} needs an API key: set the environment variable "
                    f"{spec.api_key_env}"
                )
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.Client(
            base_url=spec.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(spec.timeout_s),
            # One pooled connection per concurrent request.
            limits=httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency),
        )
        self.tokenizer = None
        if spec.tokenizer is not None:
            from transformers import AutoTokenizer


            self.tokenizer = AutoTokenizer.from_pretrained(resolve_source(spec.tokenizer, spec.cache_dir))

    def close(self) -> None:
        self.client.close()

    # --- transport ---

    def _post_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``completions`` with retries; returns the decoded JSON answer."""
        import httpx

        body = {"model": self.spec.openai_model, **body}
        delay = self.spec.backoff_s
        last_problem = ""
        for attempt in range(self.spec.max_retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                response = self.client.post("completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as error:
                last_problem = f"{type(error).__name__}: {error}"
                log.warning("request to %s failed (%s), attempt %d", self.spec.base_url, last_problem, attempt + 1)
                continue
            if response.status_code in _RETRYABLE_STATUS:
                last_problem = f"HTTP {response.status_code}: {response.text[:200]}"
                log.warning("server %s answered %s, attempt %d", self.spec.base_url, last_problem, attempt + 1)
                continue
            if response.status_code != 200:
                raise BackendRequestError(
                    f"{self.spec.base_url} refused the request (HTTP {response.status_code}): {response.text[:300]}"
                )
            problem = _not_a_completion(response)
            if problem is None:
                return response.json()
            last_problem = problem
            log.warning("server %s answered %s, attempt %d", self.spec.base_url, last_problem, attempt + 1)
        raise BackendRequestError(
            f"{self.spec.base_url} failed {self.spec.max_retries + 1} times; last: {last_problem}"
        )

    def _map(self, function: Callable[[Any], T], items: list[Any]) -> list[T]:
        """Apply ``function`` to items with at most ``concurrency`` requests in flight, in order."""
        if len(items) <= 1 or self.spec.concurrency == 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(function, items))

    # --- TextModel ---

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

        def one(prompt_and_seed: tuple[str, int]) -> str:
            prompt, seed = prompt_and_seed
            answer = self._post_completion({
                "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": int(seed) % (2**63),
            })
            return answer["choices"][0]["text"]

        return self._map(one, list(zip(prompts, seeds, strict=True)))

    def logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")

        def one(prompt_and_continuation: tuple[str, str]) -> float:
            prompt, continuation = prompt_and_continuation
            if not continuation:
                return 0.0
            # max_tokens=1: some servers reject 0; the generated token lies past the text and is ignored.
            answer = self._post_completion({
                "prompt": prompt + continuation, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0,
            })
            block = answer["choices"][0].get("logprobs")
            if not block or "text_offset" not in block:
                raise BackendRequestError(f"{self.spec.base_url} returned no echoed log-probs; it needs echo support")
            end = len(prompt) + len(continuation)
            total = 0.0
            for offset, value in zip(block["text_offset"], block["token_logprobs"], strict=True):
                if len(prompt) <= offset < end and value is not None:
                    total += value
            return total

        return self._map(one, list(zip(prompts, continuations, strict=True)))

    def next_token_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        def one(prompt: str) -> list[float]:
            answer = self._post_completion({
                "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": TOP_LOGPROBS,
            })
            block = answer["choices"][0].get("logprobs") or {}
            alternatives = (block.get("top_logprobs") or [None])[0]
            if not alternatives:
                raise BackendRequestError(
                    f"{self.spec.base_url} returned no top log-probs; the judge's logit mode needs them"
                )
            return [alternatives.get(option, -math.inf) for option in options]

        return self._map(one, prompts)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise TokenizerUnavailableError(
                f"model {self.spec.openai_model!r} at {self.spec.base_url} has no local tokenizer: set "
                "'tokenizer' in its model spec to count tokens"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._require_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self._require_tokenizer().decode(list(token_ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def load_weights(self, path_or_uri: str, sha256: str, version: str | None = None) -> None:
        raise ModelError(
            "the openai backend cannot load weights into a remote server; serve the policy with the hf or vllm "
            "backend, or restart the server on the new checkpoint"
        )
