"""torchrun killed with SIGKILL: its orphaned ranks stop gracefully instead of training on;
and Ctrl-C twice interrupts at once."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from ddptrain.preemption import StopRequest
from tests.launch import descendants, start, train, train_rows, wait_until
from tests.preempt_common import (ONLY_STOP_SAVES, assert_resumed_without_recompute,
                                  assert_stopped_at_step_boundary)


@pytest.mark.slow
def test_ranks_stop_gracefully_when_torchrun_is_killed(reference_run, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start(run_dir, *ONLY_STOP_SAVES)
    wait_until(lambda: max(train_rows(run_dir), default=0) >= 15, proc, what="step 15")
    ranks = descendants(proc.pid)
    assert len(ranks) >= 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only; the ranks live on
    proc.wait(timeout=30)

    deadline = time.monotonic() + 120
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in ranks):
        assert time.monotonic() < deadline, "orphaned ranks kept running"
        time.sleep(0.1)
    stop_step = assert_stopped_at_step_boundary(run_dir, "launcher exited")

    train(run_dir, *ONLY_STOP_SAVES)
    assert_resumed_without_recompute(run_dir, stop_step, reference_run)


@pytest.mark.slow
def test_ranks_exit_when_torchrun_is_killed_during_their_startup(tmp_path):
    """Killed while its ranks still import torch or form the process group, torchrun
    leaves them waiting for its store (30 min); they notice and exit within seconds."""
    run_dir = str(tmp_path / "run")
    proc = start(run_dir)
    deadline = time.monotonic() + 60
    while len(descendants(proc.pid)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "no ranks started"
        time.sleep(0.02)
    ranks = descendants(proc.pid)
    # Past the ranks' first ~0.1 s (before ddptrain's startup watch exists: a TODO in
    # ddptrain/startup_signals.py), still inside their seconds of importing torch.
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    try:
        while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in ranks):
            assert time.monotonic() < deadline, "orphaned ranks still waiting"
            time.sleep(0.1)
    finally:  # never leave orphans behind a failed test
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_second_ctrl_c_interrupts_immediately():
    stop = StopRequest(["SIGINT"])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        stop.restore()
