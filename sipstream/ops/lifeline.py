"""Children of `sipstream run` never outlive it.

`sipstream run` turns SIGTERM into the Ctrl-C path (stop the workers, then the broker). If it is killed
outright (SIGKILL, OOM killer), Linux's parent-death signal ends its children too: each worker and the
learner, started with ``SIPSTREAM_SUPERVISOR_PID`` in its environment, asks for SIGKILL when that
process dies. A hard stop is safe: offsets are committed only after records are acknowledged, so a
rerun or replay redoes at most the batches in flight.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from sipstream.config import SUPERVISOR_ENV

__all__ = ["SUPERVISOR_ENV", "die_with_supervisor", "terminate_as_interrupt"]
_PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> bool:
    """In a child of `sipstream run` (Linux): die when the supervisor does. Returns whether it is armed."""
    expected = os.environ.get(SUPERVISOR_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return False

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != int(expected):  # the supervisor died before the request took effect
        os._exit(1)
    return True


def terminate_as_interrupt() -> Any:
    """SIGTERM raises KeyboardInterrupt in the main thread, so `finally` blocks stop what was started.
    Returns the handler it replaced, for `signal.signal(signal.SIGTERM, previous)` afterwards."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)
