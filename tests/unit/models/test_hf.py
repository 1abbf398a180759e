"""The transformers backend on the tiny GPT-2: shapes, seeded determinism, batch = one-by-one,
agreement with a naive uncached forward pass, and weight reload."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_model

from sipstream.models.base import WeightsMismatchError, sha256_file
from sipstream.models.hf import HFModel, continuation_logprobs, sample_next_tokens

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Call me Ishmael.",
    "",
    "The",
    "Some years ago, never mind how long precisely, having little or no money in my purse,",
]
SEEDS = [11, 12, 13, 14, 15]


def full_ids(model: HFModel, prompt: str) -> list[int]:
    return model.prompt_ids(prompt)


def naive_greedy(model: HFModel, prompt: str, steps: int) -> list[int]:
    """Reference: re-run the whole sequence each step, no cache, no padding."""
    ids = full_ids(model, prompt)
    produced = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            if token == model.eos_token_id:
                break
            produced.append(token)
            ids.append(token)
    return produced


def test_generate_returns_one_text_per_prompt_within_budget(tiny_model):
    token_rows = tiny_model.generate_ids(PROMPTS, max_new_tokens=7, seeds=SEEDS)
    assert len(token_rows) == len(PROMPTS)
    assert all(1 <= len(row) <= 7 for row in token_rows)
    texts = tiny_model.generate(PROMPTS, max_new_tokens=7, seeds=SEEDS)
    assert texts == [tiny_model.decode(row) for row in token_rows]
    assert all(isinstance(text, str) and text for text in texts)


def test_generate_rejects_missing_seeds(tiny_model):
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny_model.generate(PROMPTS, max_new_tokens=3, seeds=SEEDS[:2])


def test_same_seed_same_rollout_and_different_seeds_differ(tiny_model):
    first = tiny_model.generate_ids(PROMPTS, 12, SEEDS)
    again = tiny_model.generate_ids(PROMPTS, 12, SEEDS)
    other = tiny_model.generate_ids(PROMPTS, 12, [seed + 100 for seed in SEEDS])
    assert first == again
    assert all(a != b for a, b in zip(first, other, strict=True))


def test_batched_generation_equals_one_by_one(tiny_model):
    # batch_size=3 in the fixture, so 5 prompts also cross a chunk boundary.
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        batched = tiny_model.generate_ids(PROMPTS, 16, SEEDS, temperature=temperature, top_p=top_p)
        single = [tiny_model.generate_ids([prompt], 16, [seed], temperature=temperature, top_p=top_p)[0]
                  for prompt, seed in zip(PROMPTS, SEEDS, strict=True)]
        assert batched == single


def test_greedy_cached_left_padded_equals_naive_forward(tiny_model):
    batched = tiny_model.generate_ids(PROMPTS, 8, SEEDS, temperature=0.0)
    assert batched == [naive_greedy(tiny_model, prompt, 8) for prompt in PROMPTS]
    # A vanishing nucleus keeps only the top token: the same as greedy.
    assert tiny_model.generate_ids(PROMPTS, 8, SEEDS, top_p=1e-9) == batched


def test_inverse_cdf_sampler_matches_softmax_and_respects_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    uniforms = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    tokens = sample_next_tokens(logits, uniforms, temperature=1.0, top_p=1.0)
    frequencies = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.03)
    # probs ≈ [0.64, 0.24, 0.09, 0.03]: top_p=0.8 keeps the first two tokens only.
    nucleus = sample_next_tokens(logits, uniforms, temperature=1.0, top_p=0.8)
    assert set(nucleus.tolist()) == {0, 1}
    nucleus_frequencies = torch.bincount(nucleus, minlength=2).float() / 4000
    assert abs(nucleus_frequencies[0] - 0.64 / 0.88) < 0.03
    assert sample_next_tokens(logits[:2], uniforms[:2], temperature=0.0, top_p=1.0).tolist() == [0, 0]


def test_logprobs_match_naive_sum_and_batch(tiny_model):
    continuations = [" and a wife.", " Some years ago", " hello", "", " x y z"]
    batched = tiny_model.logprobs(PROMPTS, continuations)
    for prompt, continuation, value in zip(PROMPTS, continuations, batched, strict=True):
        prompt_ids = full_ids(tiny_model, prompt)
        continuation_ids = tiny_model.encode(continuation)
        ids = torch.tensor([prompt_ids + continuation_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_model.model(input_ids=ids).logits[0].float(), -1)
        expected = sum(float(log_probs[len(prompt_ids) - 1 + k, token]) for k, token in enumerate(continuation_ids))
        assert value == pytest.approx(expected, abs=1e-4)
    assert batched[3] == 0.0  # empty continuation
    assert all(value < 0 for index, value in enumerate(batched) if index != 3)


def test_continuation_logprobs_masks_positions():
    logits = torch.zeros(1, 3, 4)  # uniform: every token has log-prob -log 4
    total = continuation_logprobs(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[0.0, 1.0, 1.0]]))
    assert total.item() == pytest.approx(-2 * torch.log(torch.tensor(4.0)).item())


def test_next_token_logprobs_match_full_forward(tiny_model):
    options = [" YES", " NO", " 1"]
    batched = tiny_model.next_token_logprobs(PROMPTS, options)
    option_ids = [tiny_model.encode(option)[0] for option in options]
    for prompt, row in zip(PROMPTS, batched, strict=True):
        with torch.no_grad():
            logits = tiny_model.model(input_ids=torch.tensor([full_ids(tiny_model, prompt)])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), -1)[option_ids].tolist()
        assert row == pytest.approx(expected, abs=1e-4)


def test_next_token_logprobs_read_past_the_tokens_all_options_share(tiny_model):
    # Like Gemma's " 1" = "▁" + "1": the shared " Option" goes into the prompt first.
    options = [" Option 1", " Option 2"]
    shared = tiny_model.encode(" Option")
    row = tiny_model.next_token_logprobs([PROMPTS[1]], options)[0]
    with torch.no_grad():
        logits = tiny_model.model(input_ids=torch.tensor([full_ids(tiny_model, PROMPTS[1]) + shared])).logits[0, -1]
    log_probs = torch.log_softmax(logits.float(), -1)
    expected = [float(log_probs[tiny_model.encode(option)[len(shared)]]) for option in options]
    assert row == pytest.approx(expected, abs=1e-4)


def test_long_prompts_are_truncated_from_the_left(tiny_spec):
    model = HFModel(tiny_spec.model_copy(update={"max_prompt_tokens": 32}))
    long_prompt = "word " * 200 + "the very end"
    ids = model.prompt_ids(long_prompt, reserve=8)
    assert len(ids) == 24
    assert model.decode(ids).endswith("the very end")
    assert len(model.generate_ids([long_prompt], 8, [1])[0]) <= 8
    assert model.logprobs([long_prompt], [" more words"])[0] < 0


def test_token_helpers_round_trip(tiny_model):
    text = "Emma Woodhouse, handsome, clever, and rich — café!"
    ids = tiny_model.encode(text)
    assert tiny_model.decode(ids) == text
    assert tiny_model.count_tokens(text) == len(ids) > 5


def _perturbed_copy(tiny_spec, tmp_path):
    """Weights of a differently seeded tiny model, saved the way the learner saves them."""
    other = HFModel(tiny_spec.model_copy(update={"seed": 7}))
    path = tmp_path / "step-1.safetensors"
    save_model(other.model, str(path))  # save_model drops the tied lm_head copy
    return other, path


def test_load_weights_replaces_weights_in_place(tiny_spec, tmp_path):
    model = HFModel(tiny_spec)
    other, path = _perturbed_copy(tiny_spec, tmp_path)
    before = model.generate_ids(PROMPTS[:2], 6, SEEDS[:2])
    model.load_weights(f"file://{path}", sha256_file(path), version="v1")
    assert model.weights_version == "v1"
    assert model.generate_ids(PROMPTS[:2], 6, SEEDS[:2]) == other.generate_ids(PROMPTS[:2], 6, SEEDS[:2]) != before
    # The tied output projection follows the embeddings.
    assert torch.equal(model.model.lm_head.weight, other.model.lm_head.weight)


def test_load_weights_refuses_bad_sha_and_keeps_current_weights(tiny_spec, tmp_path):
    model = HFModel(tiny_spec)
    _, path = _perturbed_copy(tiny_spec, tmp_path)
    before = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match="sha256"):
        model.load_weights(str(path), "0" * 64)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.model.state_dict().items())
    assert model.weights_version is None


def test_load_weights_refuses_wrong_shapes(tiny_spec, tmp_path):
    from safetensors.torch import save_file

    model = HFModel(tiny_spec)
    tensors = {name: tensor.clone() for name, tensor in model.model.state_dict().items() if name != "lm_head.weight"}
    tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightsMismatchError, match="shape"):
        model.load_weights(str(path), sha256_file(path))
    missing_path = tmp_path / "missing.safetensors"
    save_file({"transformer.wte.weight": model.model.transformer.wte.weight.detach().clone()}, str(missing_path))
    with pytest.raises(WeightsMismatchError, match="missing"):
        model.load_weights(str(missing_path), sha256_file(missing_path))


def test_importing_the_model_layer_stays_cheap():
    code = "import sys, sipstream.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "False"]
