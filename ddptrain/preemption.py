"""Graceful stop: signal handlers that only set a flag, an optional cloud preemption-notice
watcher, and the all-ranks stop decision.

A handler never saves, logs or raises: it records which signal arrived. The watcher (a
daemon thread) polls the provider's metadata endpoint and sets the same flag. The trainer
asks :meth:`StopRequest.agreed` at every step boundary (one tiny all-reduce), so all ranks
stop after the same step, write one complete checkpoint and exit.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

from torch import nn

from ddptrain import dist, startup_signals

log = logging.getLogger(__name__)

DEFAULT_STOP_SIGNALS = startup_signals.EARLY_SIGNALS
NOTICE_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
}
AWS_TOKEN_PATH = "/latest/api/token"
#: Test-only fault injection (shared with checkpoint.py): "signal_in_backward@STEP[:SIG]"
#: makes rank 0 send itself SIG (default SIGUSR1) from a gradient hook during the
#: backward pass of optimizer step STEP.
FAULT_ENV = "DDPTRAIN_TEST_FAULT"


class StopRequest:
    """Flag set by stop signals (or by a watcher) and agreed on by all ranks."""

    def __init__(self, signal_names: tuple[str, ...] | list[str] = DEFAULT_STOP_SIGNALS):
        self.reason: Optional[str] = None
        self.requested_at: Optional[float] = None
        self._previous = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._take_over_startup_signals()

    def _take_over_startup_signals(self) -> None:
        """A stop signal that arrived during setup (see ddptrain.startup_signals) is a
        request like any other; :meth:`restore` goes back to the handlers from before."""
        originals, received = startup_signals.hand_over()
        for signum, original in originals.items():
            if signum in self._previous:
                self._previous[signum] = original
            else:  # caught during setup, but not one of this run's stop signals
                signal.signal(signum, original)
        for signum, at in received:
            if signum in self._previous:
                self.request(signal.Signals(signum).name, at=at)
            else:
                signal.raise_signal(signum)  # what it would have done without ddptrain

    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.request(signal.Signals(signum).name)

    def request(self, reason: str, at: Optional[float] = None) -> None:
        """Ask for a graceful stop (``at``: when, by time.monotonic(); default now); the
        first reason wins, later requests are ignored (a second signal during the save
        changes nothing)."""
        if self.reason is None:
            self.requested_at = time.monotonic() if at is None else at
            self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def agreed(self) -> bool:
        """True on every rank when any rank has a stop request (collective)."""
        return dist.any_rank(self.requested)

    def seconds_since_request(self) -> Optional[float]:
        return None if self.requested_at is None else time.monotonic() - self.requested_at

    def seconds_since_first_request(self) -> Optional[float]:
        """Seconds since the earliest request on any rank (collective); None if none."""
        mine = self.seconds_since_request()
        earliest = dist.max_over_ranks(-1.0 if mine is None else mine)
        return None if earliest < 0 else earliest

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class NoticeWatcher:
    """Polls a cloud provider's preemption notice from a daemon thread.

    aws: ``GET <url>`` answers 200 with JSON (``{"action": "terminate", "time": ...}``)
    once a stop is scheduled and 404 before; an IMDSv2 session token is fetched from the
    same host first and IMDSv1 is used when that fails. gcp: ``GET <url>`` with
    ``Metadata-Flavor: Google`` answers ``TRUE`` or ``FALSE``. Any failed poll (no route,
    timeout, HTTP error, odd body) is simply "no notice"; the next poll comes
    ``poll_seconds`` later. On the first notice ``on_notice(description)`` is called once
    and polling ends. Proxies from the environment are bypassed: the metadata service is
    link-local.
    """

    def __init__(self, provider: str, url: Optional[str], poll_seconds: float,
                 on_notice: Callable[[str], None], timeout_s: float = 2.0):
        if provider not in NOTICE_URLS:
            raise ValueError(f"unknown preemption notice provider {provider!r}")
        self.provider = provider
        self.url = url or NOTICE_URLS[provider]
        self.poll_seconds = poll_seconds
        self.on_notice = on_notice
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="preemption-notice",
                                        daemon=True)

    def start(self) -> "NoticeWatcher":
        log.info("watching for %s preemption notices at %s every %gs", self.provider,
                 self.url, self.poll_seconds)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.is_set():
            notice = self.poll()
            if notice is not None:
                log.warning("preemption notice: %s; stopping after this step", notice)
                self.on_notice(notice)
                return
            self._done.wait(self.poll_seconds)

    def poll(self) -> Optional[str]:
        """One poll: a short description of the notice, or None when there is none."""
        try:
            return self._poll_aws() if self.provider == "aws" else self._poll_gcp()
        # URLError, HTTPError (404: no notice), timeouts, broken responses, bad URLs
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.debug("preemption notice poll of %s: %s", self.url, exc)
            return None

    def _get(self, url: str, headers: dict[str, str], method: str = "GET") -> str:
        request = urllib.request.Request(url, headers=headers, method=method)
        with self._opener.open(request, timeout=self.timeout_s) as response:
            return response.read(4096).decode("utf-8", "replace")

    def _poll_aws(self) -> Optional[str]:
        headers = {}
        token = self._aws_token()
        if token:
            headers["X-aws-ec2-metadata-token"] = token
        body = self._get(self.url, headers)  # 404 (no notice) raises HTTPError
        try:
            action = json.loads(body)
            return f"aws spot {action.get('action', '?')} at {action.get('time', '?')}"
        except (ValueError, AttributeError):
            return f"aws spot instance-action {body[:100]!r}"

    def _aws_token(self) -> Optional[str]:
        parts = urllib.parse.urlsplit(self.url)
        token_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, AWS_TOKEN_PATH,
                                             "", ""))
        try:
            return self._get(token_url, {"X-aws-ec2-metadata-token-ttl-seconds": "60"},
                             method="PUT").strip() or None
        except (OSError, ValueError, http.client.HTTPException):
            return None  # IMDSv1-only endpoint

    def _poll_gcp(self) -> Optional[str]:
        body = self._get(self.url, {"Metadata-Flavor": "Google"})
        return "gcp preemption" if body.strip().upper() == "TRUE" else None


def start_notice_watcher(provider: str, url: Optional[str], poll_seconds: float,
                         stop: StopRequest, local_rank: int) -> Optional[NoticeWatcher]:
    """A running watcher on each node's local rank 0 (the notice is per machine, and any
    rank's request stops all of them), or None when ``provider`` is "off"."""
    if provider == "off" or local_rank != 0:
        return None
    return NoticeWatcher(provider, url, poll_seconds, stop.request).start()


def install_test_signal(module: nn.Module, next_step: Callable[[], int], rank: int) -> None:
    """Test-only (see FAULT_ENV): a signal that arrives in the middle of a backward pass."""
    spec = os.environ.get(FAULT_ENV, "")
    match = re.fullmatch(r"signal_in_backward@(\d+)(?::(SIG[A-Z0-9]+))?", spec)
    if match is None or rank != 0:
        return
    step, signum = int(match.group(1)), getattr(signal, match.group(2) or "SIGUSR1")
    # The first parameter's gradient is among the last ones computed.
    first = next(module.parameters())

    def send_during_backward(grad):
        if next_step() == step:
            log.error("test fault: sending %s during backward of step %d",
                      signal.Signals(signum).name, step)
            os.kill(os.getpid(), signum)
        return grad

    first.register_hook(send_during_backward)


class LauncherWatch:
    """Under torchrun: ask for a graceful stop when the launcher process dies.

    torchrun starts every rank in its own session, so killing torchrun (``kill -9``, an
    OOM kill) leaves the ranks running with nobody to restart or stop them. When the
    parent process changes, this daemon thread requests a stop: the ranks finish the
    step, commit a checkpoint and exit, instead of training on as orphans.
    """

    def __init__(self, stop: StopRequest, poll_seconds: float = 1.0):
        self.stop_request = stop
        self.poll_seconds = poll_seconds
        # The launcher as seen at process start: it may have died during setup already.
        self.parent = startup_signals.launcher_pid() or os.getppid()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.poll_seconds):
            if os.getppid() != self.parent:
                log.warning("the launcher (pid %d) exited; stopping after this step",
                            self.parent)
                self.stop_request.request("launcher exited")
                return

    def stop(self) -> None:
        self._done.set()


def start_launcher_watch(stop: StopRequest) -> Optional[LauncherWatch]:
    """A :class:`LauncherWatch` when this process was started by torchrun, else None."""
    return LauncherWatch(stop) if "TORCHELASTIC_RUN_ID" in os.environ else None
