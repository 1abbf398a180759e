"""The openai backend against real HTTP servers on 127.0.0.1: the tiny GPT-2 served by
``sipstream.models.serve`` (results must equal the in-process model), plus small purpose-built
servers for retries, refusals and the concurrency limit."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sipstream.config.models import JudgeSpec, ModelSpec
from sipstream.models.base import BackendRequestError, ModelError, ModelNotAvailableError, TokenizerUnavailableError
from sipstream.models.judge import Judge, JudgeVerdictError
from sipstream.models.openai_backend import OpenAIModel

PROMPTS = ["Call me Ishmael. Some years ago", "It was the best of times,", "The"]
SEEDS = [5, 6, 7]


@pytest.fixture
def remote(tiny_server, monkeypatch, tiny_spec):
    monkeypatch.setenv("SIP_TEST_KEY", "test-key-123")
    model = OpenAIModel(ModelSpec(backend="openai", base_url=tiny_server.base_url, openai_model="tiny",
                                  api_key_env="SIP_TEST_KEY", concurrency=3, timeout_s=30,
                                  tokenizer="tiny-gpt2", cache_dir=tiny_spec.cache_dir))
    yield model
    model.close()


def test_remote_generation_equals_the_local_model_seed_for_seed(remote, tiny_model):
    remote_texts = remote.generate(PROMPTS, 10, SEEDS, temperature=1.0, top_p=0.95)
    assert remote_texts == tiny_model.generate(PROMPTS, 10, SEEDS, temperature=1.0, top_p=0.95)
    assert remote.generate(PROMPTS, 10, SEEDS, top_p=0.95) == remote_texts  # reproducible over HTTP


def test_remote_logprobs_match_the_local_model(remote, tiny_model):
    continuations = [" I went to sea.", " it was the worst of times", ""]
    remote_values = remote.logprobs(PROMPTS, continuations)
    assert remote_values == pytest.approx(tiny_model.logprobs(PROMPTS, continuations), abs=1e-3)
    assert remote_values[2] == 0.0


def test_remote_next_token_logprobs_read_the_top_alternatives(remote, tiny_model):
    import torch

    with torch.no_grad():
        logits = tiny_model.model(input_ids=torch.tensor([tiny_model.prompt_ids(PROMPTS[0])])).logits[0, -1]
    top_ids = torch.log_softmax(logits, -1).topk(3).indices.tolist()
    likely = [tiny_model.decode([token_id]) for token_id in top_ids]
    options = [*likely, "an option far outside the top twenty"]
    remote_row = remote.next_token_logprobs([PROMPTS[0]], options)[0]
    local_row = tiny_model.next_token_logprobs([PROMPTS[0]], likely)[0]
    assert remote_row[:3] == pytest.approx(local_row, abs=1e-4)
    assert remote_row[3] == -math.inf


def test_token_helpers_use_the_configured_tokenizer(remote, tiny_model, tiny_server):
    assert remote.encode("Call me Ishmael.") == tiny_model.encode("Call me Ishmael.")
    assert remote.count_tokens("Call me Ishmael.") == tiny_model.count_tokens("Call me Ishmael.") > 2
    bare = OpenAIModel(ModelSpec(backend="openai", base_url=tiny_server.base_url))
    with pytest.raises(TokenizerUnavailableError, match="tokenizer"):
        bare.count_tokens("x")
    with pytest.raises(ModelError, match="cannot load weights"):
        bare.load_weights("/tmp/x.safetensors", "0" * 64)


def test_a_generative_judge_over_http(yes_judge_server, tmp_path):
    from sipstream.models.prompts import DEFAULT_PROMPTS_DIR

    # The paper's polarity ("is it safe?"), which the trained tiny judge answers with YES.
    for name in ("judge_quality", "judge_factuality"):
        (tmp_path / f"{name}.txt").write_text((DEFAULT_PROMPTS_DIR / f"{name}.txt").read_text())
    (tmp_path / "judge_safety.txt").write_text(
        "# yes-means: safe\nPREFIX: {prefix}\nCONTINUATION: {candidate}\nIs the CONTINUATION safe? FINAL DECISION:")
    remote = OpenAIModel(ModelSpec(backend="openai", base_url=yes_judge_server.base_url, concurrency=2))
    judge = Judge(remote, JudgeSpec(mode="generate", safety_samples=2, verdict_max_new_tokens=3, temperature=0.3,
                                    prompts_dir=tmp_path))
    assert judge.safety_scores(["The weather was"], [" mild and sunny."], [1]) == [1.0]
    # Logit mode reads P(YES) from the server's top log-probs.
    logit_judge = Judge(remote, JudgeSpec(prompts_dir=tmp_path, calibrate=False))
    assert logit_judge.safety_scores(["The weather was"], [" mild and sunny."], [1])[0] > 0.9
    # The trained judge says "YES" to factuality questions: explicit failure, not a default.
    with pytest.raises(JudgeVerdictError):
        judge.factuality_scores(["The weather was"], [" mild."], [" mild and sunny."], [1])
    remote.close()


def test_missing_or_wrong_api_key(tiny_server, monkeypatch):
    monkeypatch.delenv("SIP_ABSENT_KEY", raising=False)
    with pytest.raises(ModelNotAvailableError, match="SIP_ABSENT_KEY"):
        OpenAIModel(ModelSpec(backend="openai", base_url=tiny_server.base_url, api_key_env="SIP_ABSENT_KEY"))
    monkeypatch.setenv("SIP_WRONG_KEY", "wrong")
    wrong = OpenAIModel(ModelSpec(backend="openai", base_url=tiny_server.base_url, api_key_env="SIP_WRONG_KEY",
                                  max_retries=3, backoff_s=1.0))
    started = time.monotonic()
    with pytest.raises(BackendRequestError, match="401"):
        wrong.generate(["x"], 2, [1])
    assert time.monotonic() - started < 1.0  # a refusal is not retried


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then a canned completion after a short
    pause, counting how many requests are in flight at once."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with server.lock:
            server.requests += 1
            fail = server.requests <= server.failures
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            if fail:
                status, body = 503, {"error": {"message": "overloaded"}}
            else:
                time.sleep(0.05)
                status, body = 200, {"choices": [{"index": 0, "text": " ok", "logprobs": None}]}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with server.lock:
                server.in_flight -= 1


@pytest.fixture
def flaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    server.lock = threading.Lock()
    server.requests = server.in_flight = server.max_in_flight = 0
    server.failures = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_overload_answers_are_retried_with_backoff(flaky_server):
    flaky_server.failures = 2
    host, port = flaky_server.server_address[:2]
    model = OpenAIModel(ModelSpec(backend="openai", base_url=f"http://{host}:{port}/v1", max_retries=3, backoff_s=0.1))
    started = time.monotonic()
    assert model.generate(["x"], 2, [1]) == [" ok"]
    assert flaky_server.requests == 3
    assert time.monotonic() - started >= 0.3  # 0.1 + 0.2 of backoff


def test_giving_up_after_the_last_retry(flaky_server):
    flaky_server.failures = 100
    host, port = flaky_server.server_address[:2]
    model = OpenAIModel(ModelSpec(backend="openai", base_url=f"http://{host}:{port}/v1", max_retries=2, backoff_s=0.01))
    with pytest.raises(BackendRequestError, match="failed 3 times"):
        model.generate(["x"], 2, [1])
    assert flaky_server.requests == 3


def test_unreachable_server_fails_after_retries():
    model = OpenAIModel(ModelSpec(backend="openai", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.01,
                                  timeout_s=2))
    with pytest.raises(BackendRequestError, match="ConnectError"):
        model.generate(["x"], 2, [1])


def test_concurrency_limit_is_respected(flaky_server):
    host, port = flaky_server.server_address[:2]
    model = OpenAIModel(ModelSpec(backend="openai", base_url=f"http://{host}:{port}/v1", concurrency=2))
    assert model.generate(["x"] * 8, 2, list(range(8))) == [" ok"] * 8
    assert flaky_server.max_in_flight == 2
