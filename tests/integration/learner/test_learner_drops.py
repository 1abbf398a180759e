"""Every record the learner looks at is accounted: trained, or dropped for a named reason (dead-lettered,
duplicate, tie, stale), also in the step it holds when it is stopped. Against the real embedded broker."""

from __future__ import annotations

import json
import signal
import time

from sipstream.bus import topics as T
from sipstream.bus.tail import TopicTail
from sipstream.config import merged
from sipstream.config.learner import LearnerConfig
from sipstream.learner.loop import run_learner

DROPS = ("dropped_stale", "skipped_duplicate", "skipped_no_rejected", "deadlettered")


def test_an_oversized_record_and_a_lone_surrogate_are_dead_lettered_and_the_pair_behind_them_trains(
        bus, tiny_cfg, tmp_path, make_pair) -> None:
    cfg = merged(tiny_cfg, runner={"max_record_bytes": 4096, "deadletter_max_value_bytes": 1024})
    oversized = {**make_pair(1), "prefix": "word " * 1000}  # a valid pair of ~5 KB
    surrogate = json.dumps({**make_pair(2), "item_id": "\ud800"}).encode()  # valid JSON and schema: "\\ud800" escaped
    assert b'"\\ud800"' in surrogate and len(json.dumps(oversized)) > 4096
    bus.produce(T.PAIRS, [make_pair(0), oversized, surrogate, make_pair(3)], key="one-partition")

    learner = LearnerConfig(algo="dpo", device="cpu", batch_pairs=2, max_steps=1, poll_timeout_s=0.2,
                            weight_store=(tmp_path / "store").as_uri(), checkpoint_dir=tmp_path / "ckpt")
    state = run_learner(cfg, bus.bootstrap, learner=learner, handle_signals=False)

    assert state.step == 1 and state.counters["pairs_trained"] == 2  # pairs 0 and 3
    assert state.counters["deadlettered"] == 2 and state.counters["consumed"] == 4
    letters = bus.values(T.DEADLETTER, expect=2)
    assert [(d["error"], d["offset"], d["stage"]) for d in letters] == [("too_large", 1, "learner"),
                                                                      ("bad_encoding", 2, "learner")]
    assert "limit runner.max_record_bytes=4096" in letters[0]["reason"]
    assert "lone surrogate" in letters[1]["reason"]
    assert letters[0]["value_bytes"] == len(json.dumps(oversized).encode()) and letters[0]["truncated"]


def test_a_stopped_learner_accounts_the_step_it_holds(bus, tiny_cfg, tmp_path, make_pair, start_learner) -> None:
    # Step 1 trains pairs 0 and 1 and publishes v1. The next step is still short of its second pair when
    # the learner is stopped; it has looked at a stale pair, a duplicate, a tie, one good pair and a bad record.
    bus.produce(T.PAIRS, [make_pair(0), make_pair(1),
                          make_pair(2, policy_version=0),  # stale once v1 is out (max_policy_lag 0)
                          make_pair(1),  # a duplicate
                          make_pair(90, tie=True),  # no DPO pair
                          make_pair(3, policy_version=1),
                          b"{not json"],  # dead-lettered: its dead letter says the learner got this far
                key="one-partition")
    log = tmp_path / "learner.log"
    proc = start_learner(tiny_cfg, "stop", "stopped", tmp_path, log, sync_every=1, max_policy_lag=0)
    try:
        with TopicTail(bus.bootstrap, bus.topic(T.DEADLETTER), T.load_specs()[T.DEADLETTER].partitions) as letters:
            deadline = time.monotonic() + 120
            while not letters.count:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                letters.poll(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    run_dir = tmp_path / "runs" / "stopped"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counters = manifest["learner"]["counters"]
    assert manifest["status"] == "finished"
    assert counters["consumed"] == 7 and counters["pairs_trained"] == 3  # the step in hand was finished
    assert {k: counters.get(k, 0) for k in DROPS} == {"dropped_stale": 1, "skipped_duplicate": 1,
                                                      "skipped_no_rejected": 1, "deadlettered": 1}
    assert counters["consumed"] == counters["pairs_trained"] + sum(counters[k] for k in DROPS)
    assert manifest["topics"][T.PAIRS]["records"] == 7  # the consumption log lists every record looked at
    state = json.loads((max((run_dir / "learner").glob("step-*")) / "state.json").read_text())
    assert sum(state["positions"].values()) == 7 and state["counters"] == counters
    assert state["step"] == 2 and state["version"] == 2


def announced_versions(tail: TopicTail, values: list[dict], run_name: str) -> list[int]:
    tail.poll(0.2)
    return [v["version"] for v in values if v["run_name"] == run_name]


def test_a_learner_killed_before_its_first_checkpoint_never_announces_a_version_again(
        bus, tiny_cfg, tmp_path, make_pair, start_learner) -> None:
    bus.produce(T.PAIRS, [make_pair(i) for i in range(8)], key="one-partition")
    log = tmp_path / "learner.log"
    settings = {"sync_every": 1, "checkpoint_every": 1000}  # a publication every step, no checkpoint
    values: list[dict] = []
    with TopicTail(bus.bootstrap, bus.topic(T.WEIGHTS), 1, on_record=values.append) as weights:
        victim = start_learner(tiny_cfg, "crash", "crashed", tmp_path, log, **settings)
        try:
            deadline = time.monotonic() + 120
            while not announced_versions(weights, values, "crashed"):
                assert victim.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
        weights.poll(1.0)
        assert not (tmp_path / "runs" / "crashed" / "learner").exists() or not any(
            (tmp_path / "runs" / "crashed" / "learner").glob("step-*"))  # killed before its first checkpoint
        before = announced_versions(weights, values, "crashed")

        restarted = start_learner(tiny_cfg, "crash", "crashed", tmp_path, log, **settings, max_steps=3)
        assert restarted.wait(180) == 0, log.read_text()[-3000:]
        weights.poll(1.0)
        announcements = [v for v in values if v["run_name"] == "crashed"]

    versions = [a["version"] for a in announcements]
    assert versions == sorted(set(versions)), versions  # strictly increasing: none older, none repeated
    after = announcements[len(before):]
    # Without a checkpoint the restarted learner re-trains from the start weights (steps 1..3 again), under
    # versions after the last one announced.
    assert [a["step"] for a in after] == [1, 2, 3] and after[0]["version"] == before[-1] + 1
    assert after[0]["sha256"] == announcements[0]["sha256"]  # step 1 again: the same pairs, the same weights
