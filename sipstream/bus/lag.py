"""Consumer lag from the bus alone: a group's committed offsets against its input topic's end offsets.

Lag is what a stage has not yet *committed*, so it counts records in flight in a batch as waiting, and
the learner's lag includes the pairs since its last checkpoint (it commits only what a checkpoint
covers). End offsets come from `TopicTail` (reading to the end), not `get_watermark_offsets`, which the
embedded broker gets wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from sipstream.bus import topics as T

# The consumer group of each stage reads this topic (groups are `<bus.group_prefix>.<stage>`).
STAGE_INPUTS: dict[str, str] = {
    "split": T.DOCUMENTS,
    "rewrite": T.PREFIXES,
    "rollout": T.REWRITTEN,
    "judge": T.ROLLOUTS,
    "assemble": T.JUDGED,
    "learner": T.PAIRS,
    "echo": T.DOCUMENTS,  # diagnostics stage; shown only once its group has committed
}
PIPELINE_STAGES = ("split", "rewrite", "rollout", "judge", "assemble", "learner")


def group_lag(end_offsets: Mapping[int, int], committed: Mapping[int, int]) -> int:
    """Records after the group's committed offset, summed over partitions. A partition the group never
    committed counts from offset 0 (data topics keep every record: `retention.ms: -1`)."""
    return sum(max(end - committed.get(p, 0), 0) for p, end in end_offsets.items())


class CommittedOffsets:
    """Reads consumer groups' committed offsets with one probe consumer per group, kept across calls.
    A probe never subscribes, so it never joins the group or moves its partitions."""

    def __init__(self, base: Mapping[str, Any]) -> None:
        """`base`: client settings with bootstrap.servers (`sipstream.bus.client.admin_config`)."""
        self._base = dict(base)
        self._probes: dict[str, Any] = {}

    def get(self, group: str, topic: str, partitions: Iterable[int], timeout: float = 10.0) -> dict[int, int]:
        """{partition: committed offset} for the partitions the group has committed (others absent)."""

        probe = self._probes.get(group)
        if probe is None:
            probe = Consumer({**self._base, "group.id": group, "enable.auto.commit": False})
            self._probes[group] = probe
        wanted = [TopicPartition(topic, p) for p in partitions]
        if not wanted:
            return {}
        return {tp.partition: tp.offset for tp in probe.committed(wanted, timeout=timeout) if tp.offset >= 0}

    def close(self) -> None:
        for probe in self._probes.values():
            probe.close()
        self._probes.clear()
