"""sipstream.telemetry.metrics: the documented names, their conventions, and one registry per process."""

from __future__ import annotations

import re
from pathlib import Path

import sipstream.telemetry.metrics as M
from sipstream.telemetry.metrics import SPECS, ProcessMetrics, documented_names

ROOT = Path(__file__).resolve().parents[2]
TABLE_NAME = re.compile(r"^\| (sipstream_[a-z_]+) \|", re.MULTILINE)


def _type_lines(metrics: ProcessMetrics) -> dict[str, str]:
    text = metrics.text().decode()
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_names_follow_prometheus_conventions() -> None:
    for spec in SPECS:
        assert re.fullmatch(r"sipstream_[a-z][a-z_]*[a-z]", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram" or "duration" in spec.name or "_load" in spec.name:
            assert spec.name.endswith("_seconds"), f"{spec.name}: durations are in base units (seconds)"
        assert not {"run", "stage"} & set(spec.labels)  # every series has them already
    assert len({s.name for s in SPECS}) == len(SPECS)


def test_the_module_docstring_and_the_readme_document_exactly_the_served_names() -> None:
    everything = documented_names("worker") | documented_names("learner")
    assert set(TABLE_NAME.findall(M.__doc__ or "")) == everything
    readme = (ROOT / "docs" / "observability.md").read_text()  # the metrics table moved there from the README
    section = readme[readme.index("## Watching a run"):]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    assert set(TABLE_NAME.findall(section)) == everything


def test_each_process_serves_its_documented_names_with_their_types() -> None:
    for process in ("worker", "learner"):
        served = _type_lines(ProcessMetrics(process, run="r", stage="s"))  # type: ignore[arg-type]
        assert set(served) == documented_names(process)  # type: ignore[arg-type]
        kinds = {s.name: s.kind for s in SPECS}
        assert all(served[name] == kinds[name] for name in served)


def test_registries_are_per_process_object_so_several_live_in_one_interpreter() -> None:
    a = ProcessMetrics("worker", run="r", stage="split")
    b = ProcessMetrics("worker", run="r", stage="split")  # the global registry would refuse a duplicate
    a.inc("sipstream_records_consumed_total", 5, topic="t")
    assert b"sipstream_records_consumed_total{" not in b.text()
    assert b'sipstream_records_consumed_total{run="r",stage="split",topic="t"} 5.0' in a.text()


def test_sync_total_follows_a_running_count_and_survives_its_reset() -> None:
    m = ProcessMetrics("worker", run="r", stage="assemble")
    for total in (2, 5, 5, 1, 3):  # 1 after 5: the owner restarted its count
        m.sync_total("sipstream_stage_events_total", total, event="chosen.original")
    assert b'event="chosen.original",run="r",stage="assemble"} 8.0' in m.text()  # 5 before the reset, 3 after


def test_unset_gauges_serve_no_made_up_zero() -> None:
    m = ProcessMetrics("learner", run="r", stage="learner")
    m.set("sipstream_learner_reward_margin", None)  # nll/pretrain have none
    text = m.text().decode()
    assert "# TYPE sipstream_learner_reward_margin gauge" in text
    assert "sipstream_learner_reward_margin{" not in text
