"""Graceful stop under torchrun (2 processes, CPU/gloo): a stop signal or a crashed rank
never costs more than the steps since the newest complete checkpoint, and a graceful stop
costs none. Every interrupted run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from ddptrain.preemption import StopRequest
from tests.launch import (complete_steps, descendants, events, start, train, train_rows,
                          wait_until)
from tests.preempt_common import (ONLY_STOP_SAVES, TORCHRUN_STOP_ARGS,
                                  assert_bitwise_equal, assert_resumed_without_recompute,
                                  assert_stopped_at_step_boundary, ckpt_dir, logged_steps,
                                  status)

SIGNAL_AT_STEP = 26  # mid-epoch 1: epochs are 22 steps


def ranks_of(torchrun: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    with open(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    ranks = {}
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def reached(run_dir: str, step: int):
    return lambda: max(train_rows(run_dir), default=0) >= step


def keep_signalling(pids: list[int], sig: int, until, torchrun: subprocess.Popen) -> int:
    """Send ``sig`` to ``pids`` every few ms until ``until()`` or torchrun exits."""
    sent = 0
    while not until() and torchrun.poll() is None:
        for pid in pids:
            try:
                os.kill(pid, sig)
                sent += 1
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1],
                         ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_torchrun_stops_after_the_current_step(reference_run, tmp_path, sig):
    run_dir = str(tmp_path / "run")
    proc = start(run_dir, *ONLY_STOP_SAVES, torchrun_args=TORCHRUN_STOP_ARGS)
    wait_until(reached(run_dir, SIGNAL_AT_STEP), proc, what=f"step {SIGNAL_AT_STEP}")
    ranks = ranks_of(proc)
    os.kill(proc.pid, sig)
    if sig == signal.SIGTERM:  # more signals while the ranks finish the step and save
        assert keep_signalling(list(ranks.values()), sig,
                               lambda: os.path.exists(os.path.join(run_dir, "status.json"))
                               and status(run_dir)["state"] == "preempted", proc) > 0
    proc.wait(timeout=120)
    stop_step = assert_stopped_at_step_boundary(run_dir, sig.name)
    assert stop_step >= SIGNAL_AT_STEP

    train(run_dir, *ONLY_STOP_SAVES, torchrun_args=TORCHRUN_STOP_ARGS)
    assert_resumed_without_recompute(run_dir, stop_step, reference_run)


@pytest.mark.slow
def test_signal_to_a_ranks_process_group_spares_its_dataloader_workers(reference_run,
                                                                       tmp_path):
    run_dir = str(tmp_path / "run")
    args = (*ONLY_STOP_SAVES, "--data.num_workers", "2")
    proc = start(run_dir, *args, torchrun_args=TORCHRUN_STOP_ARGS)
    wait_until(reached(run_dir, SIGNAL_AT_STEP), proc, what=f"step {SIGNAL_AT_STEP}")
    rank1 = ranks_of(proc)[1]
    assert os.getpgid(rank1) == rank1  # torchrun starts each rank in its own session
    assert len(descendants(rank1)) >= 2, "no DataLoader workers to signal"
    os.killpg(rank1, signal.SIGTERM)

    assert proc.wait(timeout=120) == 0  # every rank ended cleanly
    # Only rank 1 saw the signal; rank 0 stopped because the ranks agree at each step.
    stop_step = assert_stopped_at_step_boundary(run_dir, "peer rank")
    train(run_dir, *args, torchrun_args=TORCHRUN_STOP_ARGS)
    assert_resumed_without_recompute(run_dir, stop_step, reference_run)


@pytest.mark.slow
def test_signal_during_backward_is_taken_at_the_step_boundary(reference_run, tmp_path):
    run_dir = str(tmp_path / "run")
    fault = {"DDPTRAIN_TEST_FAULT": "signal_in_backward@30:SIGUSR1"}
    first = train(run_dir, *ONLY_STOP_SAVES, env=fault, torchrun_args=TORCHRUN_STOP_ARGS)
    assert "sending SIGUSR1 during backward of step 30" in first.stderr
    assert assert_stopped_at_step_boundary(run_dir, "SIGUSR1") == 30

    train(run_dir, *ONLY_STOP_SAVES, torchrun_args=TORCHRUN_STOP_ARGS)
    assert_resumed_without_recompute(run_dir, 30, reference_run)


@pytest.mark.slow
def test_plain_python_exits_75_after_a_graceful_stop(tmp_path):
    run_dir = str(tmp_path / "run")
    args = (*ONLY_STOP_SAVES, "--train.max_steps", "6")
    first = train(run_dir, *args, nproc=0, check=False,
                  env={"DDPTRAIN_TEST_FAULT": "signal_in_backward@3:SIGTERM"})
    assert first.returncode == 75, first.stderr[-3000:]
    assert assert_stopped_at_step_boundary(run_dir, "SIGTERM") == 3
    assert train(run_dir, *args, nproc=0).returncode == 0
    assert status(run_dir)["state"] == "finished" and logged_steps(run_dir) == [1, 2, 3, 4,
                                                                                5, 6]


@pytest.mark.slow
def test_signal_during_startup_stops_before_the_first_step_then_resumes(tmp_path):
    """A SIGTERM while the ranks are still importing torch (before the trainer's handlers
    exist) used to kill it; now it is kept and the group stops before training."""
    run_dir = str(tmp_path / "run")
    args = ("--train.max_steps", "4")
    first = train(run_dir, *args, torchrun_args=TORCHRUN_STOP_ARGS, check=False,
                  env={"DDPTRAIN_TEST_FAULT": "signal_at_startup:SIGTERM"})
    assert first.returncode == 0, first.stderr[-3000:]  # a requested stop, under torchrun
    assert status(run_dir)["state"] == "preempted" and status(run_dir)["step"] == 0
    [preempted] = events(run_dir, "preempted")
    assert preempted["reason"] == "SIGTERM" and preempted["step"] == 0
    assert train_rows(run_dir) == {} and complete_steps(ckpt_dir(run_dir)) == []
    train(run_dir, *args)
    assert status(run_dir)["state"] == "finished" and logged_steps(run_dir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_signal_during_startup_of_a_finished_run_still_reports_finished(tmp_path):
    run_dir = str(tmp_path / "run")
    args = ("--train.max_steps", "3")
    train(run_dir, *args, nproc=0)
    again = train(run_dir, *args, nproc=0, check=False,
                  env={"DDPTRAIN_TEST_FAULT": "signal_at_startup:SIGTERM"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert status(run_dir)["state"] == "finished" and events(run_dir, "preempted") == []


@pytest.mark.slow
def test_sigkill_of_a_rank_torchrun_restarts_the_group_and_it_finishes(reference_run,
                                                                        tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start(run_dir, torchrun_args=("--max-restarts", "2", *TORCHRUN_STOP_ARGS))
    wait_until(lambda: complete_steps(ckpt_dir(run_dir)) and reached(run_dir, 25)(), proc,
               what="step 25 and a checkpoint")
    newest_before = max(complete_steps(ckpt_dir(run_dir)))
    os.kill(ranks_of(proc)[1], signal.SIGKILL)
    killed_after = max(train_rows(run_dir))

    assert proc.wait(timeout=300) == 0
    started = events(run_dir, "run_started")
    assert [e["torchrun_restart_count"] for e in started] == ["0", "1"]
    [resumed] = events(run_dir, "resumed")
    assert newest_before <= resumed["step"] <= killed_after
    assert status(run_dir)["state"] == "finished"
    assert_bitwise_equal(reference_run, run_dir)
    ours, ref = train_rows(run_dir), train_rows(reference_run)
    assert [ours[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]


def test_stop_request_keeps_the_first_reason_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(["SIGUSR2"])
    try:
        assert not stop.requested and stop.seconds_since_request() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # a second signal changes nothing
        stop.request("aws spot terminate")
        assert stop.reason == "SIGUSR2" and stop.seconds_since_request() >= 0
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_startup_signals_become_a_stop_request_and_handlers_are_restored():
    from ddptrain import startup_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    startup_signals.catch(("SIGUSR1", "SIGUSR2"))
    os.kill(os.getpid(), signal.SIGUSR2)  # during setup: recorded, the process lives on
    stop = StopRequest(["SIGUSR2"])  # SIGUSR1 was caught early but is not a stop signal
    try:
        assert stop.reason == "SIGUSR2" and stop.seconds_since_request() >= 0
        assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]
        assert startup_signals.hand_over() == ({}, [])  # taken over once
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) == before[signal.SIGUSR2]


def test_preempt_config_errors_name_the_key():
    from ddptrain.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config(["--preempt.signals", "[SIGTERM, SIGKILL]",
                      "--preempt.poll_seconds", "0"])
    assert "preempt.signals" in str(error.value) and "'SIGKILL' is not one of" in str(
        error.value)
    assert "preempt.poll_seconds=0.0: must be > 0" in str(error.value)
    cfg = parse_config(["--preempt.signals", "[SIGUSR2]", "--preempt.notice", "gcp"])
    assert cfg.preempt.signals == ["SIGUSR2"] and cfg.preempt.notice == "gcp"


def test_a_preempted_rank_exits_0_only_under_torchrun(monkeypatch):
    from ddptrain.__main__ import exit_status
    from ddptrain.run_files import ExitCode

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert exit_status(ExitCode.PREEMPTED) == 75 and exit_status(ExitCode.FINISHED) == 0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert exit_status(ExitCode.PREEMPTED) == 0
    assert exit_status(ExitCode.BAD_INPUT) == 2
