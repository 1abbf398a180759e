"""The benchmark suite stays runnable: `python -m benchmarks --quick` end to end, as CI runs it.

A real run (embedded broker, tiny random models, worker processes), not a check of the numbers
themselves: every section must report positive measurements and its targets as met / not met.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"bus", "broker", "rollout", "judge", "learner", "memory"}


@pytest.mark.slow
def test_quick_suite_reports_every_section(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SIPSTREAM_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "suite.json").read_text())
    assert results["quick"] is True and set(results["sections"]) == SECTIONS
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["cpu_model"]
    assert "full mode only" in results["sections"]["memory"]["skipped"]  # a whole `sipstream run`: full mode only
    for name in SECTIONS - {"memory"}:
        section = results["sections"][name]
        assert "error" not in section, (name, section.get("error"))
        assert section["metrics"] and all(value > 0 for value in section["metrics"].values()), (name, section["metrics"])
        for target in section["targets"]:
            assert target["met"] == (target["value"] >= target["goal"]), target
    # Each target the issue names has its ratio, and every baseline was measured in the same run.
    targets = {(name, t["key"]) for name, s in results["sections"].items() for t in s.get("targets", [])}
    assert targets == {("bus", "ratio"), ("rollout", "ratio"), ("learner", "ratio")}
    assert {"raw_echo_per_s", "runner_echo_per_s", "runner_latency_p99_s", "raw_latency_p99_s"} <= set(
        results["sections"]["broker"]["metrics"])
    assert {"logit_items_per_s", "generate_items_per_s"} <= set(results["sections"]["judge"]["metrics"])
    assert {"reload_p50_s", "reload_p95_s"} <= set(results["sections"]["learner"]["metrics"])
    markdown = (tmp_path / "suite.md").read_text()
    unmet = sum(not t["met"] for s in results["sections"].values() for t in s.get("targets", []))
    assert "## Targets" in markdown and markdown.count("**not met**") == unmet
