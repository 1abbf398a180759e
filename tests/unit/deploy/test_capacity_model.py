"""benchmarks/capacity.py: the arithmetic that sizes a deployment."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.capacity import Hardware, Workload, judge_calls_per_item, plan, render


def test_judge_calls_count_every_ordered_pair_and_every_pointwise_sample() -> None:
    assert judge_calls_per_item(16, 5) == (18, 18 * 17 + 18 * 6)
    assert judge_calls_per_item(2, 5, with_rewrite=False) == (3, 6 + 18)


def test_workers_scale_linearly_with_tokens_and_judge_quadratically_with_rollouts() -> None:
    base = plan(Workload(tokens_per_day=1e9), Hardware())
    double = plan(Workload(tokens_per_day=2e9), Hardware())
    assert double.items_per_s == pytest.approx(2 * base.items_per_s)
    assert double.rollout_gpus >= 2 * base.rollout_gpus - 1
    few = plan(Workload(tokens_per_day=1e9, rollouts=4), Hardware())
    assert base.judge_gpus / few.judge_gpus > 5  # 414 vs 66 calls per item
    assert base.rollout_gpus / few.rollout_gpus < 5


def test_measured_throughput_overrides_the_estimate() -> None:
    estimated = plan(Workload(tokens_per_day=1e9), Hardware())
    slow = plan(Workload(tokens_per_day=1e9), replace(Hardware(), decode_tps=estimated.detail["decode_tps_per_gpu"] / 4))
    assert slow.rollout_gpus > 3 * estimated.rollout_gpus


def test_partitions_cover_the_workers_that_consume_them() -> None:
    p = plan(Workload(tokens_per_day=1e9), Hardware())
    assert p.partitions["sip.rewritten"] >= p.rollout_gpus
    assert p.partitions["sip.rollouts"] >= p.judge_workers
    assert p.partitions["sip.prefixes"] >= p.rewrite_gpus
    assert all(n >= 4 for n in p.partitions.values())


def test_report_marks_gpu_figures_as_estimates() -> None:
    text = render([("x", Workload(), Hardware(), plan(Workload(), Hardware()))], None)
    assert "estimate" in text.lower() and "none was measured" in text
