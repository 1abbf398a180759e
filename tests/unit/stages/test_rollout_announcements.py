"""The rollout stage reads weight announcements with the one parser; a record it rejects is counted and ignored."""

from __future__ import annotations

from sipstream.bus import topics as T
from sipstream.bus.records import weights_announcement
from sipstream.config import RolloutConfig
from sipstream.stages.rollout import RolloutStage


def announcement(version: int, run_name: str = "run") -> dict:
    return dict(weights_announcement(run_name=run_name, version=version, uri=f"file:///w/v{version}.safetensors",
                                     sha256="a" * 64, step=version, created_at="2026-12-02T12:00:00Z"))


def test_the_newest_announcement_of_the_run_is_pending_and_a_bad_one_is_ignored() -> None:
    stage = RolloutStage(policy=None, rollout=RolloutConfig(), run_name="run")  # no weights are loaded here
    stage.on_control(T.WEIGHTS, announcement(2))
    stage.on_control(T.WEIGHTS, announcement(1))  # older: not newer than the pending one
    stage.on_control(T.WEIGHTS, announcement(9, run_name="other"))  # another run's
    stage.on_control(T.WEIGHTS, {**announcement(5), "version": "5"})  # hand-written, wrong type
    stage.on_control(T.WEIGHTS, {k: v for k, v in announcement(6).items() if k != "sha256"})
    assert stage._pending == announcement(2)
    assert stage.counters["weights_invalid"] == 2
