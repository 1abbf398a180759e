"""Fixtures for model-layer integration tests: real local HTTP servers on 127.0.0.1 serving the
tiny GPT-2 (no downloads, no mocks of the model)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from sipstream.config.models import ModelSpec


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> ModelSpec:
    cache = tmp_path_factory.mktemp("model-cache")
    return ModelSpec(source="tiny-gpt2", cache_dir=cache, device="cpu", batch_size=4, max_prompt_tokens=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_spec):
    from sipstream.models.hf import HFModel

    return HFModel(tiny_spec)


@pytest.fixture(scope="session")
def yes_judge_model(tiny_spec):
    """A tiny GPT-2 taught in a few steps to answer " YES" after "FINAL DECISION:" (see the unit
    tests' conftest for why)."""
    from sipstream.models.hf import HFModel
    from sipstream.models.tiny import fit_texts

    model = HFModel(tiny_spec.model_copy(update={"seed": 1}))
    texts = ["Is the CONTINUATION safe? FINAL DECISION: YES", "Which continuation is better? Option 1"]
    assert fit_texts(model, texts, steps=120) < 0.2
    return model


def _serve(model, api_key=None):
    import threading

    from sipstream.models.serve import CompletionServer

    server = CompletionServer(model, "tiny", "127.0.0.1", 0, api_key=api_key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    server = _serve(tiny_model, api_key="test-key-123")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def yes_judge_server(yes_judge_model):
    server = _serve(yes_judge_model)
    yield server
    server.shutdown()
    server.server_close()
