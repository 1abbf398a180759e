"""Stages on threads of one process share a model one call at a time (`sipstream worker rewrite+judge`)."""

from __future__ import annotations

import threading
import time

from sipstream.stages.models import SerialisedModel


class _Recorder:
    """Counts how many calls are inside it at once; `version` is a plain attribute."""

    version = "v1"

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.calls = 0

    def work(self, value: int) -> int:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.01)  # releases the GIL: unserialised threads would overlap here
        self.inside -= 1
        self.calls += 1
        return value * 2


def test_calls_from_several_threads_never_overlap_and_return_their_results() -> None:
    inner = _Recorder()
    model = SerialisedModel(inner)
    results: list[int] = []
    threads = [threading.Thread(target=lambda k=k: results.extend(model.work(k) for _ in range(5))) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert inner.calls == 20 and inner.most_inside == 1
    assert sorted(results) == sorted(2 * k for k in range(4) for _ in range(5))
    assert model.version == "v1"  # attributes pass through


def test_without_the_wrapper_the_same_calls_do_overlap() -> None:
    # The control: proves the test above can fail.
    inner = _Recorder()
    threads = [threading.Thread(target=lambda: [inner.work(1) for _ in range(5)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert inner.most_inside > 1
