"""RecordFetcher without a broker: records by offset, and the one-line errors for lost ranges.

A stand-in consumer is used here on purpose: a range lost to retention cannot be produced on the embedded
broker (Tansu enforces no retention.ms and answers DeleteRecords by closing the connection; both were tried),
and real Kafka cannot run on these machines. Reading by offset is also tested against the real broker in
tests/integration/replay."""

from __future__ import annotations

from collections import deque

import pytest

from sipstream.bus.fetch import RecordFetcher
from sipstream.errors import UserError


class Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class FakeConsumer:
    """A partition whose retained records are `first..last`; reading below `first` resets to it."""

    def __init__(self, partition: int, start: int, first: int, last: int) -> None:
        self.queue = deque(Msg(partition, o) for o in range(max(start, first), last + 1))
        self.closed = False

    def consume(self, n: int, timeout: float) -> list[Msg]:
        return [self.queue.popleft() for _ in range(min(n, len(self.queue)))]

    def close(self) -> None:
        self.closed = True


def fetcher(first: int, last: int) -> RecordFetcher:
    f = RecordFetcher(bus=None, bootstrap="nowhere:9092", topic="exp.sip.pairs", timeout_s=0.01, batch=3)

    def open_(partition: int, offset: int) -> None:
        f.consumers[partition] = FakeConsumer(partition, offset, first, last)
        f.buffers[partition] = deque()
        f.fresh[partition] = True

    f._open = open_  # type: ignore[method-assign]
    return f


def test_records_come_back_by_offset_in_order_with_gaps_and_reseeks() -> None:
    f = fetcher(0, 20)
    assert [f.get(1, o).offset() for o in (2, 3, 7, 19)] == [2, 3, 7, 19]
    assert f.get(1, 4).offset() == 4  # an earlier offset re-seeks
    assert [m.offset() for m in f.read_range(2, 5, 9)] == [5, 6, 7, 8]


def test_a_range_lost_to_retention_names_the_partition_and_the_setting() -> None:
    with pytest.raises(UserError) as err:
        fetcher(first=10, last=20).get(3, 4)
    message = str(err.value)
    assert "\n" not in message
    assert "exp.sip.pairs partition 3" in message and "from 4" in message and "is now 10" in message
    assert "retention.ms=-1" in message and "sipstream export" in message


def test_a_topic_that_ends_before_the_range_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="no record at offset 30"):
        fetcher(0, 20).get(0, 30)
