"""Fixtures for `sipstream eval` on real tiny models: the random tiny GPT-2 (built in code, no
downloads) plays policy and judge, and a perturbed copy of its weights stands for trained weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest

from sipstream.eval import EvalConfig

#: Small enough for CI (a few seconds per evaluation), big enough to exercise every metric.
SMALL = EvalConfig(winrate_prompts=6, safety_prompts=4, factuality_pairs=8, perplexity_docs=2,
                   perplexity_max_tokens=48, max_new_tokens=8, prefix_words=24)


@pytest.fixture(scope="session")
def small() -> EvalConfig:
    return SMALL


@pytest.fixture(scope="session")
def eval_cfg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file: configs/smoke.yaml's tiny models, on CPU, built into a test cache."""
    import yaml

    from sipstream.config import project_root

    cache = tmp_path_factory.mktemp("model-cache")
    data = yaml.safe_load((project_root() / "configs" / "smoke.yaml").read_text())
    tiny = {"source": "tiny-gpt2", "cache_dir": str(cache), "device": "cpu", "max_prompt_tokens": 256}
    data["models"] = {"policy": tiny, "judge": tiny, "rewriter": tiny}
    path = tmp_path_factory.mktemp("eval-config") / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def eval_cfg(eval_cfg_file: Path):
    from sipstream.config import load_config

    return load_config(eval_cfg_file, env={})


@pytest.fixture(scope="session")
def perturbed_tensors(eval_cfg):
    """The tiny policy's tensors (each storage once, as the learner publishes them) with noise added."""
    import torch

    from sipstream.learner.weights import unique_state_dict
    from sipstream.models.hf import HFModel

    model = HFModel(eval_cfg.models.policy)
    generator = torch.Generator().manual_seed(7)
    tensors = unique_state_dict(model.model)
    return {name: (t + 0.05 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t)
            for name, t in tensors.items()}


@pytest.fixture(scope="session")
def published_run(tmp_path_factory: pytest.TempPathFactory, perturbed_tensors):
    """A run directory laid out as `sipstream run` leaves it: two versions published by the learner's
    WeightStore under <run>/<name>/weights/<name>/, the second the perturbed weights."""
    from sipstream.learner.weights import WeightStore

    run_dir = tmp_path_factory.mktemp("run")
    store = WeightStore((run_dir / "smoke" / "weights").as_uri(), "smoke")
    first = store.publish({k: v.clone() * 0 + v for k, v in perturbed_tensors.items()}, 1, 1, {"run_name": "smoke"})
    second = store.publish({k: v * 1.01 for k, v in perturbed_tensors.items()}, 2, 2, {"run_name": "smoke"})
    return run_dir, first, second


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, eval_cfg, perturbed_tensors):
    """A run directory as `sipstream run --config configs/smoke.yaml` leaves it: its resolved config in
    config.yaml (a tiny GPT-2 policy, not configs/tiny.yaml's SmolLM2) and two learner publications."""
    import yaml

    from sipstream.learner.weights import WeightStore

    run_dir = tmp_path_factory.mktemp("smoke-run")
    # What `sipstream run` writes for its children: the JSON dump of the resolved config, run_dir set.
    resolved = eval_cfg.model_dump(mode="json") | {"run_dir": str(run_dir)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    store = WeightStore((run_dir / eval_cfg.run_name / "weights").as_uri(), eval_cfg.run_name)
    first = store.publish({k: v.clone() for k, v in perturbed_tensors.items()}, 1, 1, {"run_name": eval_cfg.run_name})
    second = store.publish({k: v * 1.01 for k, v in perturbed_tensors.items()}, 2, 2, {"run_name": eval_cfg.run_name})
    return run_dir, first, second
