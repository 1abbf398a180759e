"""The consumption log: appended per batch, cut back to the checkpoint on resume, ranges kept."""

from __future__ import annotations

from sipstream.runs.consumption import ConsumptionLog, iter_records, ranges, read_log


def test_a_resume_cuts_the_log_back_to_the_lines_its_checkpoint_covers(tmp_path) -> None:
    path = tmp_path / "consumption.jsonl"
    log = ConsumptionLog(path, keep_lines=0)
    log.append(1, [(0, 0), (1, 0)], [0, 1])
    log.append(2, [(0, 1), (0, 2)], [1])
    log.sync()
    covered = log.lines  # a checkpoint here
    log.append(3, [(1, 1), (0, 3)], [0, 1])  # trained after it, then kill -9
    log.close()
    with open(path, "a") as file:
        file.write('{"batch": 3, "step"')  # a torn line

    resumed = ConsumptionLog(path, keep_lines=covered)
    assert resumed.lines == 2 and resumed.ranges == {0: [0, 3], 1: [0, 1]}
    resumed.append(3, [(1, 1), (0, 3)], [0, 1])  # re-read after the restart
    resumed.close()
    entries = read_log(path)
    assert [e["batch"] for e in entries] == [0, 1, 2]
    assert list(iter_records(entries)) == [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1), (0, 3)]
    assert ranges(entries) == {0: [0, 4], 1: [0, 2]}


def test_a_fresh_run_starts_an_empty_log(tmp_path) -> None:
    path = tmp_path / "consumption.jsonl"
    path.write_text('{"batch":0,"step":1,"records":[[0,5]],"trained":[0]}\n')
    log = ConsumptionLog(path, keep_lines=0)  # no checkpoint: nothing of an earlier life counts
    log.close()
    assert read_log(path) == []
