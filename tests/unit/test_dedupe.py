import pytest

from sipstream.bus.dedupe import SeenIds


def test_duplicates_are_refused_and_counted() -> None:
    seen = SeenIds()
    ids = ["a", "b", "a", "c", "b", "a"]
    assert [seen.first_time(i) for i in ids] == [True, True, False, True, False, False]
    assert seen.duplicates == 3 and len(seen) == 3 and "c" in seen


def test_window_is_bounded_and_keeps_recent_ids() -> None:
    seen = SeenIds(capacity=3)
    for i in "abcd":
        seen.first_time(i)
    assert len(seen) == 3 and "a" not in seen
    assert seen.first_time("b") is False  # still remembered; refreshes b
    seen.first_time("e")  # evicts c, the least recently seen
    assert "c" not in seen and "b" in seen
    with pytest.raises(ValueError):
        SeenIds(capacity=0)
