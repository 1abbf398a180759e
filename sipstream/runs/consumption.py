"""The consumption log: which `sip.pairs` records each optimizer step looked at, in order.

    <run_dir>/consumption.jsonl, one line per accounted batch:
    {"batch": 3, "step": 3, "records": [[partition, offset], ...], "trained": [index into records, ...]}

`records` lists every record the batch looked at, in the order the consumer delivered them (trained,
skipped, stale or dead-lettered alike); `trained` says which of them became examples. `step` is the
optimizer step after the batch (a batch in which every record was skipped takes no step and keeps the
previous number). Replaying the concatenated `records` through the same loop reproduces every step.

Durability follows the checkpoint: lines are appended and flushed as batches are accounted, fsync'd
just before a checkpoint is written, and the checkpoint stores how many lines it covers. A resume
cuts the log back to that count, so the log never lists records whose training was lost in a crash
(they are re-read and logged again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_NAME = "consumption.jsonl"


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a consumption log (a torn last line from a crash is ignored)."""
    entries = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):
                break
            entries.append(json.loads(line))
    return entries


def iter_records(entries: list[dict[str, Any]]) -> Iterator[tuple[int, int]]:
    """The (partition, offset) sequence the learner looked at, in order."""
    for entry in entries:
        for partition, offset in entry["records"]:
            yield int(partition), int(offset)


def ranges(entries: list[dict[str, Any]]) -> dict[int, list[int]]:
    """{partition: [first offset, last offset + 1]} over the logged records."""
    out: dict[int, list[int]] = {}
    for partition, offset in iter_records(entries):
        span = out.setdefault(partition, [offset, offset + 1])
        span[0], span[1] = min(span[0], offset), max(span[1], offset + 1)
    return out


class ConsumptionLog:
    """Append-only writer of the consumption log; keeps the consumed ranges up to date."""

    def __init__(self, path: Path, keep_lines: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_log(path)[:keep_lines] if path.exists() else []
        if path.exists():
            # Cut back to what the restored checkpoint covers (rewritten whole: the log is small
            # next to a checkpoint, and a rename keeps it intact if we die here).
            scratch = path.with_name(path.name + ".tmp")
            scratch.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries), encoding="utf-8")
            os.replace(scratch, path)
        self.lines = len(entries)
        self.ranges = ranges(entries)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def append(self, step: int, records: list[tuple[int, int]], trained: list[int]) -> None:
        entry = {"batch": self.lines, "step": step, "records": [list(r) for r in records], "trained": trained}
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()
        self.lines += 1
        for partition, offset in records:
            span = self.ranges.setdefault(partition, [offset, offset + 1])
            span[0], span[1] = min(span[0], offset), max(span[1], offset + 1)

    def sync(self) -> None:
        """On disk before the checkpoint that counts these lines becomes visible."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
