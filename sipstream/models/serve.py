"""A minimal OpenAI-compatible completions server for a local transformers model.

It exists so the ``openai`` backend can be tested end to end against a real HTTP server on
127.0.0.1, and so a laptop run can put its judge in a separate process. It is not a production
server: requests are answered one at a time (a lock around the model), with no micro-batching.
For real deployments use ``vllm serve`` or ``llama-server``, which speak the same API.

Supported: ``GET /v1/models``; ``POST /v1/completions`` with ``prompt`` (string or list),
``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``logprobs`` (top-k alternatives per
generated token) and ``echo`` (prompt tokens with their log-probs, as vLLM returns them).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sipstream.config.models import ModelSpec
from sipstream.models.hf import HFModel

log = logging.getLogger(__name__)


def _token_texts_and_offsets(model: HFModel, token_ids: list[int]) -> tuple[list[str], list[int]]:
    """Text of each token and its character offset, from decoding growing prefixes (so byte-level
    tokens that split a character still add up to the decoded text)."""
    texts, offsets, decoded_length = [], [], 0
    for end in range(1, len(token_ids) + 1):
        decoded = model.decode(token_ids[:end])  # special tokens (BOS) read as empty text
        offsets.append(decoded_length)
        texts.append(decoded[decoded_length:])
        decoded_length = len(decoded)
    return texts, offsets


def complete(model: HFModel, request: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Answer one ``/v1/completions`` request body."""
    import torch

    prompts = request.get("prompt", "")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_tokens = int(request.get("max_tokens", 16))
    temperature = float(request.get("temperature", 1.0))
    top_p = float(request.get("top_p", 1.0))
    seed = request.get("seed")
    seed = int(seed) if seed is not None else int.from_bytes(os.urandom(7), "big")
    top_logprobs = request.get("logprobs")
    echo = bool(request.get("echo", False))

    choices = []
    prompt_tokens = completion_tokens = 0
    for index, prompt in enumerate(prompts):
        generated_ids = model.generate_ids([prompt], max_tokens, [seed], temperature, top_p)[0] if max_tokens else []
        text = model.decode(generated_ids)
        prompt_ids = model.prompt_ids(prompt, reserve=max_tokens)
        prompt_tokens += len(prompt_ids)
        completion_tokens += len(generated_ids)
        logprobs_block = None
        if top_logprobs is not None:
            # Score prompt + completion in one forward pass: row t predicts token t + 1.
            all_ids = prompt_ids + generated_ids
            with torch.inference_mode():
                logits = model.model(input_ids=torch.tensor([all_ids], device=model.device)).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            first = 0 if echo else len(prompt_ids)
            token_texts, offsets = _token_texts_and_offsets(model, all_ids)
            token_logprobs, alternatives = [], []
            for position in range(first, len(all_ids)):
                if position == 0:
                    token_logprobs.append(None)  # the first token has no context
                    alternatives.append(None)
                    continue
                row = log_probs[position - 1]
                token_logprobs.append(float(row[all_ids[position]]))
                top_values, top_ids = row.topk(max(int(top_logprobs), 1))
                alternatives.append({model.tokenizer.decode([token_id]): float(value)
                                     for value, token_id in zip(top_values.tolist(), top_ids.tolist(), strict=True)})
            # Offsets refer to the returned text: prompt + completion with echo, else the completion.
            base = 0 if echo or not generated_ids else offsets[len(prompt_ids)]
            logprobs_block = {
                "tokens": token_texts[first:],
                "token_logprobs": token_logprobs,
                "top_logprobs": alternatives,
                "text_offset": [offset - base for offset in offsets[first:]],
            }
        finished = len(generated_ids) < max_tokens
        choices.append({
            "index": index,
            "text": (model.decode(prompt_ids) + text) if echo else text,
            "logprobs": logprobs_block,
            "finish_reason": "stop" if finished else "length",
        })
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class CompletionServer(ThreadingHTTPServer):
    """HTTP server holding one model; ``serve_forever`` in a thread, ``shutdown`` to stop."""

    daemon_threads = True

    def __init__(self, model: HFModel, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.model_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _authorised(self) -> bool:
        if self.server.api_key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self._reply(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._reply(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._reply(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/completions":
            self._reply(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, json.JSONDecodeError) as error:
            self._reply(400, {"error": {"message": f"bad JSON body: {error}", "type": "invalid_request_error"}})
            return
        try:
            with self.server.model_lock:
                body = complete(self.server.model, request, self.server.model_name)
        except (TypeError, ValueError) as error:
            self._reply(400, {"error": {"message": str(error), "type": "invalid_request_error"}})
            return
        self._reply(200, body)


def start_server(spec: ModelSpec, host: str = "127.0.0.1", port: int = 0, model_name: str = "default",
                 api_key: str | None = None) -> tuple[CompletionServer, threading.Thread]:
    """Load the model a spec names and serve it from a background thread (``port=0``: any free
    port, read it from ``server.base_url``)."""
    server = CompletionServer(HFModel(spec), model_name, host, port, api_key)
    thread = threading.Thread(target=server.serve_forever, name="sipstream-model-server", daemon=True)
    thread.start()
    return server, thread
