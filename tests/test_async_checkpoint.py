"""Async checkpoints keep the checkpoint contract: 2-process torchrun runs on CPU/gloo.

The same fast configuration as tests/test_resume_contract.py (3 epochs of 22 steps, a
checkpoint every 10 steps and at epoch ends), with ``--ckpt.async_mode thread|process``.
Test faults (ddptrain.faults) make the background write of one step start
``TEST_DELAY_S`` late, fail, or crash the run after the write but before the commit.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from ddptrain.faults import TEST_DELAY_S
from tests.ckpt_compare import differences, load_flat
from tests.launch import (
    STEPS_PER_EPOCH,
    complete_steps,
    events,
    kill_group,
    start,
    step_dirs,
    train,
    train_rows,
    wait_until,
)

pytestmark = pytest.mark.slow
TOTAL_STEPS = 3 * STEPS_PER_EPOCH
FINAL = f"step-{TOTAL_STEPS:08d}"
MODES = ["thread", "process"]
FAULT = "DDPTRAIN_TEST_FAULT"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """An uninterrupted run with synchronous saves; keeps every checkpoint."""
    run_dir = str(tmp_path_factory.mktemp("sync-reference") / "run")
    train(run_dir)
    return run_dir


def ckpt(run_dir: str, name: str = "") -> str:
    return os.path.join(run_dir, "checkpoints", name)


def assert_bitwise_equal(run_a: str, run_b: str, name: str = FINAL) -> None:
    a, b = load_flat(ckpt(run_a, name)), load_flat(ckpt(run_b, name))
    assert any(k.startswith("model.") and "running_mean" in k for k in a), "no BatchNorm"
    assert differences(a, b) == [], f"{name} differs"


def committed(run_dir: str, step: int) -> dict:
    rows = [e for e in events(run_dir, "checkpoint_committed") if e["step"] == step]
    assert len(rows) == 1, f"step {step} committed {len(rows)} times"
    return rows[0]


def async_args(mode: str) -> tuple[str, ...]:
    return ("--ckpt.async_mode", mode)


@pytest.fixture(scope="module", params=MODES)
def delayed(request, tmp_path_factory) -> tuple[str, str]:
    """A full async run whose step-20 write starts TEST_DELAY_S late."""
    mode = request.param
    run_dir = str(tmp_path_factory.mktemp(f"delayed-{mode}") / "run")
    train(run_dir, *async_args(mode), env={FAULT: "delay_save@20"})
    return mode, run_dir


def test_async_checkpoints_are_bitwise_equal_to_sync_ones(reference, delayed):
    mode, run_dir = delayed
    assert complete_steps(ckpt(run_dir)) == complete_steps(ckpt(reference))
    for name in step_dirs(ckpt(reference)):
        assert_bitwise_equal(reference, run_dir, name)
    commits = events(run_dir, "checkpoint_committed")
    assert {e["mode"] for e in commits} == {mode, "sync"}
    assert all(e["stall_s"] is not None for e in commits if e["mode"] == mode)
    first = events(run_dir, "first_step")
    assert len(first) == 1 and 0 < first[0]["since_process_start_s"] < 300


def test_staging_isolates_the_checkpoint_from_later_steps(reference, delayed):
    """Step 20's state was staged, then training went on (changing weights, momentum and
    BatchNorm statistics) while it was written; what was written is still step 20."""
    _, run_dir = delayed
    started = [e for e in events(run_dir, "checkpoint_started") if e["step"] == 20][0]
    own_call_s = started["call_s"] - started["waited_s"]  # not waiting for step 10's save
    assert own_call_s < TEST_DELAY_S / 3
    commit_time = committed(run_dir, 20)["time"]
    steps_before_commit = [s for s, row in train_rows(run_dir).items()
                           if row["time"] < commit_time]
    assert max(steps_before_commit) >= 22, "training did not go on during the write"
    assert_bitwise_equal(reference, run_dir, "step-00000020")


def test_process_helper_starts_before_the_first_step(delayed):
    """DCP would spawn its helper on the first save, taking seconds of CPU from training;
    ddptrain starts it during setup and begins training only once it is up."""
    mode, run_dir = delayed
    helper = events(run_dir, "async_helper_started")
    if mode == "thread":
        assert helper == []
        return
    assert len(helper) == 1 and helper[0]["seconds"] > 0
    assert helper[0]["time"] <= events(run_dir, "first_step")[0]["time"]


def test_next_save_waits_for_the_one_in_flight(delayed):
    _, run_dir = delayed
    step_22 = [e for e in events(run_dir, "checkpoint_started") if e["step"] == 22][0]
    assert step_22["waited_s"] > TEST_DELAY_S / 3
    assert committed(run_dir, 20)["time"] <= step_22["time"]


@pytest.mark.parametrize("mode", MODES)
def test_kill_during_background_save_resumes_from_previous(reference, tmp_path, mode):
    run_dir = str(tmp_path / "run")
    proc = start(run_dir, *async_args(mode), env={FAULT: "delay_save@40"})
    pending = os.path.join(ckpt(run_dir, "step-00000040"), "manifest.json")
    wait_until(lambda: max(train_rows(run_dir), default=0) >= 42, proc, what="step 42")
    assert not os.path.exists(pending), "step 40 committed before the kill"
    kill_group(proc)
    proc.wait(timeout=30)
    assert not os.path.exists(pending)

    train(run_dir, *async_args(mode))
    assert [e["step"] for e in events(run_dir, "resumed")] == [30]
    assert_bitwise_equal(reference, run_dir)
    assert_bitwise_equal(reference, run_dir, "step-00000040")


@pytest.mark.parametrize("mode", MODES)
def test_crash_after_background_write_before_manifest(reference, tmp_path, mode):
    run_dir = str(tmp_path / "run")
    first = train(run_dir, *async_args(mode), env={FAULT: "kill_before_manifest@40"},
                  check=False)
    assert first.returncode != 0
    leftover = ckpt(run_dir, "step-00000040")
    assert os.path.exists(os.path.join(leftover, ".metadata"))
    assert not os.path.exists(os.path.join(leftover, "manifest.json"))

    train(run_dir, *async_args(mode))
    skipped = events(run_dir, "skipped_incomplete")
    assert [e["location"].rsplit("/", 1)[1] for e in skipped] == ["step-00000040"]
    assert [e["step"] for e in events(run_dir, "resumed")] == [30]
    assert_bitwise_equal(reference, run_dir)


def test_background_failure_is_logged_and_never_committed(reference, tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, *async_args("thread"), "--train.max_steps", "30",
          env={FAULT: "fail_save@20"})
    failed = events(run_dir, "checkpoint_failed")
    assert [e["step"] for e in failed] == [20]
    assert "rank 1: RuntimeError: test fault fail_save" in failed[0]["message"]
    assert complete_steps(ckpt(run_dir)) == [10, 22, 30]
    assert "step-00000020" not in step_dirs(ckpt(run_dir))  # debris pruned after 22
    assert_bitwise_equal(reference, run_dir, "step-00000030")


def worker_pids(launcher_pid: int) -> list[int]:
    """torchrun's direct children: the ranks (not DCP's writer processes below them)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_preemption_waits_for_the_save_in_flight(reference, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start(run_dir, *async_args("thread"), env={FAULT: "delay_save@20"})
    wait_until(lambda: max(train_rows(run_dir), default=0) >= 21, proc, what="step 21")
    for pid in worker_pids(proc.pid):
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=120)

    preempted = events(run_dir, "preempted")
    assert len(preempted) == 1
    stop_step = preempted[0]["step"]
    assert committed(run_dir, 20)["time"] <= preempted[0]["time"]
    assert stop_step in complete_steps(ckpt(run_dir))
    with open(os.path.join(run_dir, "status.json")) as f:
        assert json.load(f)["state"] == "preempted"

    train(run_dir, *async_args("thread"))
    assert [e["step"] for e in events(run_dir, "resumed")] == [stop_step]
    assert_bitwise_equal(reference, run_dir)


def test_lost_helper_process_falls_back_to_sync_saves(reference, tmp_path):
    """A rank's DCP helper killed (OOM killer, kill -9) before the step-20 save: all ranks
    notice at that save, stop their helpers, and save synchronously from then on."""
    run_dir = str(tmp_path / "run")
    train(run_dir, *async_args("process"), env={FAULT: "kill_async_helper@20"})
    [lost] = events(run_dir, "async_saving_lost")
    assert lost["step"] == 20 and lost["abandoned"] is None  # step 10's was committed
    modes = {e["step"]: e["mode"] for e in events(run_dir, "checkpoint_committed")}
    assert modes[10] == "process"
    assert all(mode == "sync" for step, mode in modes.items() if step >= 20)
    assert complete_steps(ckpt(run_dir)) == complete_steps(ckpt(reference))
    assert_bitwise_equal(reference, run_dir)
    assert_bitwise_equal(reference, run_dir, "step-00000020")
