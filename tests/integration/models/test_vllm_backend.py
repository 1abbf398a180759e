"""The vllm backend on a real GPU: seeded generation, batch = one-by-one, log-probs close to the hf
backend's, and in-place weight reload. Skipped where vLLM or CUDA is absent (CI on CPU)."""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'sipstream[vllm]')")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the vllm backend needs a CUDA GPU"),
    pytest.mark.slow,
    pytest.mark.gpu,
]

PROMPTS = ["Call me Ishmael. Some years ago", "It was the best of times,", "The"]
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def vllm_model(tiny_spec):
    from sipstream.models.vllm_backend import VLLMModel

    return VLLMModel(tiny_spec.model_copy(update={"backend": "vllm", "device": "cuda", "gpu_memory_utilization": 0.3}))


def test_seeded_generation_is_reproducible_and_batch_invariant(vllm_model):
    batched = vllm_model.generate(PROMPTS, 12, SEEDS)
    assert batched == vllm_model.generate(PROMPTS, 12, SEEDS)
    assert batched == [vllm_model.generate([prompt], 12, [seed])[0] for prompt, seed in zip(PROMPTS, SEEDS, strict=True)]
    assert batched != vllm_model.generate(PROMPTS, 12, [seed + 1 for seed in SEEDS])


def test_logprobs_agree_with_the_hf_backend(vllm_model, tiny_model):
    continuations = [" I went to sea.", " it was the worst", " end"]
    # bf16 on GPU against fp32 on CPU: close, not equal.
    assert vllm_model.logprobs(PROMPTS, continuations) == pytest.approx(
        tiny_model.logprobs(PROMPTS, continuations), rel=0.05)


def test_weights_reload_in_place(vllm_model, tiny_spec, tmp_path):
    from safetensors.torch import save_model

    from sipstream.models.base import WeightsMismatchError, sha256_file
    from sipstream.models.hf import HFModel

    other = HFModel(tiny_spec.model_copy(update={"seed": 9}))
    path = tmp_path / "step-1.safetensors"
    save_model(other.model, str(path))
    before = vllm_model.generate(PROMPTS, 8, SEEDS, temperature=0.0)
    with pytest.raises(WeightsMismatchError):
        vllm_model.load_weights(str(path), "0" * 64)
    assert vllm_model.generate(PROMPTS, 8, SEEDS, temperature=0.0) == before
    vllm_model.load_weights(str(path), sha256_file(path), version="v9")
    assert vllm_model.weights_version == "v9"
    assert vllm_model.generate(PROMPTS, 8, SEEDS, temperature=0.0) != before
