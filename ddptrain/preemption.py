"""Graceful stop: signal handlers that only set a flag, and the all-ranks stop decision.

A handler never saves, logs or raises: it records which signal arrived. The trainer asks
:meth:`StopRequest.agreed` at every step boundary (one tiny all-reduce), so all ranks stop
after the same step, write one complete checkpoint and exit.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Optional

from ddptrain import dist

log = logging.getLogger(__name__)

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class StopRequest:
    """Flag set by stop signals (or by a watcher) and agreed on by all ranks."""

    def __init__(self, signal_names: tuple[str, ...] | list[str] = DEFAULT_STOP_SIGNALS):
        self.reason: Optional[str] = None
        self.requested_at: Optional[float] = None
        self._previous = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask for a graceful stop; the first reason wins, later requests are ignored."""
        if self.reason is None:
            self.reason = reason
            self.requested_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def agreed(self) -> bool:
        """True on every rank when any rank has a stop request (collective)."""
        return dist.any_rank(self.requested)

    def seconds_since_request(self) -> Optional[float]:
        return None if self.requested_at is None else time.monotonic() - self.requested_at

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
