"""`sipstream experiment` end to end with the tiny random GPT-2 (configs/experiments/smoke.yaml): the arms see the
same pairs in the same order, make the same number of updates, and are evaluated; numbers are checked for shape
and consistency only (a random model has no quality to measure)."""

from __future__ import annotations

import json

import pytest

from sipstream.eval.heldout import is_heldout
from sipstream.experiment.config import load_experiment
from sipstream.experiment.run import run_experiment
from sipstream.experiment.stream import mixed_documents
from sipstream.experiment.summary import mean_interval
from sipstream.runs.consumption import read_log


def test_mixed_documents_hold_the_configured_share_of_training_split_bad_passages() -> None:
    exp = load_experiment("configs/experiments/cpu.yaml")
    docs = mixed_documents(exp, seed=1)
    assert len(docs) == exp.documents and docs == mixed_documents(exp, seed=1)  # seeded
    kinds = [d["meta"]["injected"] for d in docs]
    assert kinds.count("unsafe") == round(exp.unsafe_fraction * exp.documents)
    assert kinds.count("false") == round(exp.false_fraction * exp.documents)
    for doc in docs:
        assert not is_heldout("corpus", doc["doc_id"].rsplit("-s", 1)[0])
        probe_set = {"unsafe": "toxicity_prompts", "false": "false_claims"}.get(doc["meta"]["injected"])
        assert all(not is_heldout(probe_set, pid) for pid in doc["meta"]["injected_from"])
    assert mixed_documents(exp, seed=2) != docs


def test_mean_interval_is_a_t_interval_clipped_for_rates() -> None:
    out = mean_interval([0.2, 0.4, 0.6])
    assert out["mean"] == pytest.approx(0.4) and out["ci95"] == pytest.approx([0.4 - 4.303 * 0.2 / 3 ** 0.5, 0.4 + 4.303 * 0.2 / 3 ** 0.5])
    assert mean_interval([0.9, 1.0], (0.0, 1.0))["ci95"][1] == 1.0
    assert mean_interval([0.5])["ci95"] is None


@pytest.mark.slow
def test_a_smoke_experiment_trains_every_arm_on_the_same_pairs_and_evaluates_them(tmp_path) -> None:
    exp = load_experiment("configs/experiments/smoke.yaml", [f"out_dir={tmp_path}", "documents=2"])
    out = run_experiment(exp, command="test")
    results = json.loads((out / "results.json").read_text())
    assert set(results["seeds"]) == {"1", "2"}
    for seed, record in results["seeds"].items():
        arms = record["arms"]
        assert set(arms) == {"pretrain", "nll", "dpo"}
        assert {a["steps"] for a in arms.values()} == {exp.steps}  # the same number of policy updates
        sequences = {arm: [tuple(r) for e in read_log(__import__("pathlib").Path(a["run_dir"]) / "consumption.jsonl")
                           for r in e["records"]] for arm, a in arms.items()}
        # Same records in the same order, as far as the shortest arm read (algorithms skip differently).
        shortest = min(len(s) for s in sequences.values())
        assert shortest > 0 and len({tuple(s[:shortest]) for s in sequences.values()}) == 1
        assert len({a["final_sha256"] for a in arms.values()}) == 3  # different losses → different weights
        assert record["stream"]["pairs"] == record["items"] == 4
        for arm in ("pretrain", "nll", "dpo"):
            vs_start = record["evals"][arm]["vs_start"]
            assert vs_start["win_rate"]["n"] == exp.evaluation["winrate_prompts"]
            assert (out / f"seed{seed}" / arm / "eval-vs-start" / "eval.json").is_file()
        assert "vs_pretrain" in record["evals"]["dpo"] and "vs_pretrain" not in record["evals"]["pretrain"]
    summary = results["summary"]
    assert summary["vs_start"]["dpo"]["win rate"]["n"] == 2 and summary["vs_start"]["dpo"]["win rate"]["ci95"]
    # Against pretrain: every metric, not only the win rate, and win rates pooled over every prompt of every seed.
    from sipstream.experiment.summary import METRICS

    assert set(summary["vs_pretrain"]) == {"nll", "dpo"}
    assert set(summary["vs_pretrain"]["dpo"]) == {label for label, _, _ in METRICS}
    for arm in ("nll", "dpo"):
        ppl = summary["vs_pretrain"][arm]["perplexity"]
        expected = [results["seeds"][s]["evals"][arm]["vs_start"]["quality"]["model"]["perplexity"]
                    / results["seeds"][s]["evals"]["pretrain"]["vs_start"]["quality"]["model"]["perplexity"] - 1
                    for s in ("1", "2")]
        assert ppl["values"] == pytest.approx(expected)
        pooled = summary["pooled"]["vs_pretrain"][arm]
        per_seed = [results["seeds"][s]["evals"][arm]["vs_pretrain"]["win_rate"] for s in ("1", "2")]
        assert pooled["n"] == sum(w["n"] for w in per_seed) == 2 * exp.evaluation["winrate_prompts"]
        assert pooled["wins"] == sum(w["wins"] for w in per_seed)
        assert pooled["ci95"][0] <= pooled["rate"] <= pooled["ci95"][1]
    markdown = (out / "results.md").read_text()
    for arm in ("| start |", "| pretrain |", "| nll |", "| dpo |", "| dpo vs pretrain |"):
        assert arm in markdown
    for png in results["plots"]:
        assert (out / png).stat().st_size > 1000


@pytest.mark.parametrize("name", ["cpu", "cpu-wide", "gpu", "smoke"])
def test_the_shipped_experiment_configs_validate_with_their_base_configs(name: str) -> None:
    from sipstream.config import load_config
    from sipstream.eval import EvalConfig

    exp = load_experiment(f"configs/experiments/{name}.yaml")
    load_config(exp.base_config, exp.set)
    EvalConfig(**exp.evaluation)


def test_a_bad_experiment_config_is_one_clear_error(tmp_path) -> None:
    from sipstream.errors import UserError

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nbase_config: configs/smoke.yaml\nunsafe_fraction: 0.8\nfalse_fraction: 0.5\n")
    with pytest.raises(UserError, match="unsafe_fraction \\+ false_fraction"):
        load_experiment(path)
    with pytest.raises(UserError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_experiment(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_experiment(path)


@pytest.mark.slow
def test_an_online_smoke_experiment_runs_the_whole_loop_for_each_arm(tmp_path) -> None:
    """`mode: online` (the GPU config's mode) on CPU with tiny random models: every arm runs `sipstream run` with
    its own algorithm on the same documents, publishes the same number of versions and is evaluated."""
    import yaml

    exp = load_experiment("configs/experiments/smoke.yaml",
                          [f"out_dir={tmp_path}", "mode=online", "seeds=[1]", "documents=2", "arms=[pretrain, dpo]"])
    out = run_experiment(exp, command="test")
    results = json.loads((out / "results.json").read_text())
    record = results["seeds"]["1"]
    assert set(record["arms"]) == {"pretrain", "dpo"}  # nll takes the same path (the shared-mode test has all three)
    for arm, data in record["arms"].items():
        run_dir = __import__("pathlib").Path(data["run_dir"])
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["learner"]["algo"] == arm
        assert data["steps"] == exp.steps  # the run stopped at the same number of policy updates
        assert record["evals"][arm]["vs_start"]["win_rate"]["n"] == exp.evaluation["winrate_prompts"]
    assert record["stream"]["pairs"] > 0
    assert record["curriculum"] and all(k.isdigit() for k in record["curriculum"])  # by policy version
    assert results["curriculum_axis"] == "policy version"
    assert set(results["summary"]["vs_pretrain"]) == {"dpo"}


def test_a_finished_experiment_is_resummarised_from_its_results_json(tmp_path) -> None:
    """`sipstream experiment RESULTS.json` rewrites tables and plots from the per-seed evaluations as measured."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "results.json"
    shutil.copy("benchmarks/results/experiment-cpu.json", source)
    before = json.loads(source.read_text())
    done = subprocess.run([sys.executable, "-m", "sipstream", "experiment", str(source)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    after = json.loads(source.read_text())
    assert after["seeds"] == before["seeds"]  # the measurements are untouched
    assert "## Against the `pretrain` arm" in done.stdout and (tmp_path / "results.md").read_text() in done.stdout
    assert all((tmp_path / png).stat().st_size > 1000 for png in after["plots"])
    bad = tmp_path / "other.json"
    bad.write_text("{}")
    done = subprocess.run([sys.executable, "-m", "sipstream", "experiment", str(bad)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2 and "not an experiment's results.json" in done.stderr
    assert "Traceback" not in done.stderr
