"""Removing at-least-once duplicates by id.

The runner may re-deliver a batch after a crash; consumers that must not act twice (the learner, the
pair assembler) keep the ids they have seen. The window is bounded so memory stays flat on an endless
stream; it must be larger than what a crash can re-deliver (a few batches), which it is by far.
"""

from __future__ import annotations

from collections import OrderedDict


class SeenIds:
    """A bounded set of recently seen ids (least recently seen evicted first)."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0

    def first_time(self, item_id: str) -> bool:
        """True the first time an id is offered; False (and counted) for a duplicate."""
        if item_id in self._ids:
            self._ids.move_to_end(item_id)
            self.duplicates += 1
            return False
        self._ids[item_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids
