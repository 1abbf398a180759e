"""`--from-offsets` parsing and the fixed order a range replay reads its records in."""

from __future__ import annotations

import pytest

from sipstream.errors import UserError
from sipstream.replay.run import offsets_sequence, parse_offsets


def test_ranges_parse_with_exclusive_ends() -> None:
    assert parse_offsets("0:0-3, 2:5-7") == {0: (0, 3), 2: (5, 7)}


@pytest.mark.parametrize("spec, message", [
    ("0:3", "PARTITION:FIRST-END"), ("a:0-3", "PARTITION:FIRST-END"), ("0:5-5", "FIRST < END"),
    ("0:0-2,0:4-6", "given twice"), ("-1:0-2", "partition >= 0"),
])
def test_bad_ranges_say_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_offsets(spec)


def test_the_sequence_is_round_robin_over_partitions_and_covers_every_offset_once() -> None:
    ranges = {1: (10, 12), 0: (0, 4)}
    sequence = offsets_sequence(ranges)
    assert sequence == [(0, 0), (1, 10), (0, 1), (1, 11), (0, 2), (0, 3)]
    assert sorted(sequence) == sorted((p, o) for p, (lo, hi) in ranges.items() for o in range(lo, hi))
