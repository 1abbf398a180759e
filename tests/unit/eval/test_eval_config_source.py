"""Which run config `sipstream eval` uses: an explicit --config, else the config the evaluated run
recorded, else the default (no model is loaded here; see tests/integration/eval/test_eval_run_config.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sipstream.config import default_config_path
from sipstream.errors import ConfigError
from sipstream.eval.cli import load_eval_config


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("SIPSTREAM_"):
            monkeypatch.delenv(name)


def _run(folder: Path, run_name: str, source: str = "tiny-gpt2") -> Path:
    """A run directory as `sipstream run` leaves it: the resolved config in config.yaml."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"run_name": run_name, "run_dir": str(folder),
                                                        "models": {"policy": {"source": source}}}))
    return folder


def test_a_run_directory_brings_its_own_config(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", "from-run")
    for refs in ([str(run), "start"], [f"{run}@3", "start"], ["start", str(run)], [str(run), None]):
        cfg, source = load_eval_config(None, [], refs)
        assert (cfg.run_name, str(cfg.models.policy.source), source) == ("from-run", "tiny-gpt2", str(run / "config.yaml"))
    # --set still applies on top of the run's config.
    cfg, _ = load_eval_config(None, ["models.policy.device=cpu", "seed=5"], [str(run)])
    assert (cfg.run_name, cfg.models.policy.device, cfg.seed) == ("from-run", "cpu", 5)


def test_the_model_run_wins_over_the_baseline_run_and_an_explicit_config_over_both(tmp_path: Path) -> None:
    model_run = _run(tmp_path / "model", "model-run")
    baseline_run = _run(tmp_path / "baseline", "baseline-run")
    assert load_eval_config(None, [], [str(model_run), str(baseline_run)])[0].run_name == "model-run"
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("run_name: explicit\n")
    cfg, source = load_eval_config(explicit, [], [str(model_run), str(baseline_run)])
    assert (cfg.run_name, source) == ("explicit", str(explicit))


def test_a_learner_directory_has_its_config_in_the_manifest(tmp_path: Path) -> None:
    learner = tmp_path / "learner"
    learner.mkdir()
    (learner / "manifest.json").write_text(json.dumps({"kind": "learner", "config": {"run_name": "learner-run",
                                                                                    "learner": {"algo": "nll"}}}))
    cfg, source = load_eval_config(None, [], [f"{learner}@2"])
    assert (cfg.run_name, cfg.learner.algo, source) == ("learner-run", "nll", str(learner / "manifest.json"))

    (learner / "manifest.json").write_text(json.dumps({"config": {"run_name": "x", "no_such_section": 1}}))
    with pytest.raises(ConfigError, match=r"manifest.json \(its config\).*pass --config to use another"):
        load_eval_config(None, [], [str(learner)])


def test_a_bad_recorded_config_names_its_file_and_the_way_out(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", "r")
    (run / "config.yaml").write_text("run_name: r\nrunner: {batch_size: 0}\n")
    with pytest.raises(ConfigError, match=r"runner.batch_size.*config.yaml.*pass --config to use another"):
        load_eval_config(None, [], [str(run)])


def test_without_a_run_directory_the_default_config_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"  # a folder that records no config (e.g. the weight store's own folder)
    empty.mkdir()
    for refs in (["start", None], [str(tmp_path / "w.safetensors"), "start"], [str(empty), "start"]):
        cfg, source = load_eval_config(None, [], refs)
        assert source == str(default_config_path()) and cfg.run_name == "tiny"
    chosen = tmp_path / "env.yaml"
    chosen.write_text("run_name: from-env\n")
    monkeypatch.setenv("SIPSTREAM_CONFIG", str(chosen))
    assert load_eval_config(None, [], ["start", None]) == (load_eval_config(chosen, [], [])[0], str(chosen))
