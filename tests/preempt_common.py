"""Shared by the preemption tests: launch arguments and the checks of a graceful stop."""

from __future__ import annotations

import json
import os

from tests.ckpt_compare import differences, load_flat
from tests.launch import STEPS_PER_EPOCH, complete_steps, events, read_jsonl

TOTAL_STEPS = 3 * STEPS_PER_EPOCH
FINAL = f"step-{TOTAL_STEPS:08d}"
#: What README tells torchrun users to pass.
TORCHRUN_STOP_ARGS = ("--signals-to-handle", "SIGTERM,SIGUSR1,SIGUSR2",
                      "--shutdown-timeout", "60")
#: Only preempt and final checkpoints: after a stop the newest one must be the preempt one.
ONLY_STOP_SAVES = ("--ckpt.every_steps", "0", "--ckpt.at_epoch_end", "false")


def ckpt_dir(run_dir: str, name: str = "") -> str:
    return os.path.join(run_dir, "checkpoints", name)


def status(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as f:
        return json.load(f)


def logged_steps(run_dir: str) -> list[int]:
    """Steps of every train row in metrics.jsonl, in file order (all runs together)."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return [r["step"] for r in rows if r["kind"] == "train"]


def manifest(run_dir: str, step: int) -> dict:
    path = os.path.join(ckpt_dir(run_dir, f"step-{step:08d}"), "manifest.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def assert_stopped_at_step_boundary(run_dir: str, reason: str) -> int:
    """The first run stopped gracefully: status preempted, a complete preempt checkpoint
    at exactly the last logged step. Returns that step."""
    state = status(run_dir)
    assert state["state"] == "preempted" and state["reason"] == reason, state
    stop_step = logged_steps(run_dir)[-1]
    assert state["step"] == stop_step
    assert complete_steps(ckpt_dir(run_dir)) == [stop_step]
    assert manifest(run_dir, stop_step)["reason"] == "preempt"
    [stopped] = events(run_dir, "preempted")
    assert stopped["step"] == stop_step and stopped["reason"] == reason
    assert stopped["seconds_signal_to_commit"] >= 0
    assert 0 < stop_step < TOTAL_STEPS
    return stop_step


def assert_resumed_without_recompute(run_dir: str, stop_step: int, reference: str) -> None:
    """The rerun resumed at the stop step, logged every step exactly once and ended with
    the uninterrupted run's weights, optimizer and RNG state, bit for bit."""
    assert [e["step"] for e in events(run_dir, "resumed")] == [stop_step]
    assert logged_steps(run_dir) == list(range(1, TOTAL_STEPS + 1)), "steps recomputed"
    assert status(run_dir)["state"] == "finished"
    assert_bitwise_equal(reference, run_dir)


def assert_bitwise_equal(run_a: str, run_b: str, name: str = FINAL) -> None:
    a, b = load_flat(ckpt_dir(run_a, name)), load_flat(ckpt_dir(run_b, name))
    assert any(k.startswith("model.") and "running_mean" in k for k in a), "no BatchNorm"
    assert any(k.startswith("optim.state.") for k in a)
    assert differences(a, b) == []
