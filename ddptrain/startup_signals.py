"""Stop signals that arrive before the trainer's handlers exist.

Importing torch and setting up the process group take seconds, and until
:class:`ddptrain.preemption.StopRequest` installs its handlers a SIGTERM from Slurm or a
spot reclaim would kill the rank outright. :func:`catch` (the first thing ``python -m
ddptrain`` does, before any heavy import) records such signals instead;
:meth:`StopRequest.__init__` takes the record over with :func:`hand_over`, so a signal
during setup becomes an ordinary stop request. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

#: The signals caught from the start: ddptrain's default ``preempt.signals``.
EARLY_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
#: Test-only: ``signal_at_startup:SIGNAL`` sends SIGNAL to this process right after
#: :func:`catch` (the same variable as ddptrain.faults).
FAULT_ENV = "DDPTRAIN_TEST_FAULT"

_originals: dict[int, Any] = {}
_received: list[tuple[int, float]] = []  # (signal number, time.monotonic())


def catch(names: tuple[str, ...] = EARLY_SIGNALS) -> None:
    """Record ``names`` from now on instead of acting on them (main thread only)."""
    for name in names:
        signum = getattr(signal, name)
        if signum not in _originals:
            _originals[signum] = signal.signal(signum, _record)
    for fault in os.environ.get(FAULT_ENV, "").split(","):
        if fault.startswith("signal_at_startup:"):
            os.kill(os.getpid(), getattr(signal, fault.split(":", 1)[1]))


def _record(signum: int, _frame) -> None:
    if signum == signal.SIGINT and any(s == signum for s, _ in _received):
        raise KeyboardInterrupt  # a second Ctrl-C during setup: stop now
    _received.append((signum, time.monotonic()))


def hand_over() -> tuple[dict[int, Any], list[tuple[int, float]]]:
    """Stop recording: the handlers :func:`catch` replaced (signal number -> handler)
    and the signals received meanwhile, oldest first. Call it after installing the
    handlers that take over; signals caught here but not taken over are the caller's to
    reset."""
    originals, received = dict(_originals), list(_received)
    _originals.clear()
    _received.clear()
    return originals, received
