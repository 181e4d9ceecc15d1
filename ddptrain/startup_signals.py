"""Stop signals, and the launcher's death, before the trainer's handlers exist.

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
import sys
import threading
import time
from typing import Any, Optional

#: The signals caught from the start: ddptrain's default ``preempt.signals``.
EARLY_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
#: Test-only: ``signal_at_startup:SIGNAL`` sends SIGNAL to this process right after
#: :func:`catch` (the same variable as ddptrain.faults).
FAULT_ENV = "DDPTRAIN_TEST_FAULT"

_originals: dict[int, Any] = {}
_received: list[tuple[int, float]] = []  # (signal number, time.monotonic())
_launcher: Optional[int] = None  # the parent process when catch() first ran
_handed_over = threading.Event()


def catch(names: tuple[str, ...] = EARLY_SIGNALS) -> None:
    """Record ``names`` from now on instead of acting on them (main thread only).

    Under torchrun also watch the launcher until :func:`hand_over`: a rank whose torchrun
    dies during setup (when nothing is trained or saved yet) exits at once instead of
    waiting out the rendezvous timeout as an orphan that ignores stop signals.
    """
    global _launcher
    if _launcher is None:
        _launcher = os.getppid()
        if "TORCHELASTIC_RUN_ID" in os.environ:
            threading.Thread(target=_watch_launcher, name="startup-launcher-watch",
                             daemon=True).start()
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


def launcher_pid() -> Optional[int]:
    """The parent process as :func:`catch` first saw it (None if it never ran)."""
    return _launcher


def _watch_launcher(poll_seconds: float = 0.5) -> None:
    while True:
        # TODO: a torchrun that died before catch() ran (the first ~0.1 s) goes unseen;
        # pid 1 cannot stand for "gone", as torchrun is pid 1 in many containers.
        if os.getppid() != _launcher:
            sys.stderr.write(f"ddptrain: the launcher (pid {_launcher}) exited during "
                             "startup; nothing is trained or saved yet: exiting\n")
            os._exit(1)
        if _handed_over.wait(poll_seconds):
            return


def hand_over() -> tuple[dict[int, Any], list[tuple[int, float]]]:
    """Stop recording: the handlers :func:`catch` replaced (signal number -> handler)
    and the signals received meanwhile, oldest first. Call it after installing the
    handlers that take over; signals caught here but not taken over are the caller's to
    reset."""
    _handed_over.set()  # from here on the trainer's LauncherWatch looks after the launcher
    originals, received = dict(_originals), list(_received)
    _originals.clear()
    _received.clear()
    return originals, received
