"""Kill anywhere, resume, get the same model: 2-process torchrun runs on CPU/gloo.

Every run uses the embedded digits with the small BatchNorm+dropout CNN, 3 epochs of 22
steps, a checkpoint every 10 steps and at epoch ends, and logs every step.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.ckpt_compare import differences, load_flat
from tests.launch import (STEPS_PER_EPOCH, complete_steps, events, kill_group, sample_ids,
                          start, step_dirs, train, train_rows, wait_until)

pytestmark = pytest.mark.slow
TOTAL_STEPS = 3 * STEPS_PER_EPOCH
FINAL = f"step-{TOTAL_STEPS:08d}"


@pytest.fixture(scope="module")
def reference(reference_run) -> str:
    """The session's uninterrupted run (conftest); keeps every checkpoint."""
    return reference_run


def ckpt(run_dir: str, name: str = FINAL) -> str:
    return os.path.join(run_dir, "checkpoints", name)


def assert_bitwise_equal(run_a: str, run_b: str, name: str = FINAL) -> None:
    a, b = load_flat(ckpt(run_a, name)), load_flat(ckpt(run_b, name))
    assert any(k.startswith("model.") and "running_mean" in k for k in a), "BatchNorm missing"
    assert any(k.startswith("optim.state.") for k in a)
    assert differences(a, b) == []


def assert_same_steps_after(run_dir: str, reference: str, resumed_step: int) -> None:
    ours, ref = train_rows(run_dir), train_rows(reference)
    for step in range(resumed_step + 1, TOTAL_STEPS + 1):
        assert ours[step]["loss"] == ref[step]["loss"], f"loss differs at step {step}"
        assert ours[step]["lr"] == ref[step]["lr"], f"lr differs at step {step}"


def test_sigkill_at_random_step_then_same_command_ends_bitwise_equal(reference, tmp_path):
    target = random.Random(20261203).randint(12, TOTAL_STEPS - 6)
    run_dir = str(tmp_path / "run")
    proc = start(run_dir)
    wait_until(lambda: complete_steps(ckpt(run_dir, "")) and
               max(train_rows(run_dir), default=0) >= target, proc, what=f"step {target}")
    kill_group(proc)
    proc.wait(timeout=30)
    killed_after = max(train_rows(run_dir))
    assert killed_after < TOTAL_STEPS

    train(run_dir)
    resumed = events(run_dir, "resumed")
    assert len(resumed) == 1
    resumed_step = resumed[0]["step"]
    assert 10 <= resumed_step <= killed_after
    assert_bitwise_equal(reference, run_dir)
    assert_same_steps_after(run_dir, reference, resumed_step)


@pytest.fixture(scope="module")
def crashed_in_save(tmp_path_factory) -> str:
    """Killed (all ranks) after the shards of step 40 were written, before its manifest;
    then restarted with the same command. Step 30 is mid-way through epoch 1."""
    run_dir = str(tmp_path_factory.mktemp("crashed") / "run")
    first = train(run_dir, env={"DDPTRAIN_TEST_FAULT": "kill_before_manifest@40"},
                  check=False)
    assert first.returncode != 0
    leftover = ckpt(run_dir, "step-00000040")
    assert os.path.exists(os.path.join(leftover, ".metadata"))
    assert not os.path.exists(os.path.join(leftover, "manifest.json"))
    train(run_dir)
    return run_dir


def test_crash_between_shards_and_manifest_resumes_previous(reference, crashed_in_save):
    skipped = events(crashed_in_save, "skipped_incomplete")
    assert [e["location"].rsplit("/", 1)[1] for e in skipped] == ["step-00000040"]
    assert [e["step"] for e in events(crashed_in_save, "resumed")] == [30]
    assert_bitwise_equal(reference, crashed_in_save)
    assert_bitwise_equal(reference, crashed_in_save, "step-00000040")


def test_mid_epoch_resume_consumes_the_same_samples(reference, crashed_in_save):
    resumed_step = events(crashed_in_save, "resumed")[0]["step"]
    assert resumed_step > STEPS_PER_EPOCH and resumed_step % STEPS_PER_EPOCH
    ours, ref = sample_ids(crashed_in_save), sample_ids(reference)
    assert sorted(ours) == list(range(1, TOTAL_STEPS + 1))
    assert ours == ref
    for epoch in range(3):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        seen = [i for s in steps for i in ours[s]]
        assert len(seen) == len(set(seen)) == STEPS_PER_EPOCH * 64


def test_lr_and_loss_after_resume_equal_uninterrupted(reference, crashed_in_save):
    assert_same_steps_after(crashed_in_save, reference, 30)
    rng_keys = [k for k in load_flat(ckpt(crashed_in_save)) if k.startswith("rng/")]
    assert {k.split(".")[0] for k in rng_keys} == {"rng/rank0", "rng/rank1"}


@pytest.fixture(scope="module")
def stopped_at_30(tmp_path_factory) -> str:
    """A run stopped by train.max_steps=30: complete checkpoints 10, 20, 22, 30."""
    run_dir = str(tmp_path_factory.mktemp("partial") / "run")
    train(run_dir, "--train.max_steps", "30")
    assert complete_steps(ckpt(run_dir, "")) == [10, 20, 22, 30]
    return run_dir


def copy_run(source: str, tmp_path) -> str:
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    for name in ("metrics.jsonl", "events.jsonl"):
        os.remove(os.path.join(run_dir, name))
    return run_dir


def test_newer_incomplete_directory_is_skipped_then_pruned(reference, stopped_at_30,
                                                           tmp_path):
    run_dir = copy_run(stopped_at_30, tmp_path)
    fake = ckpt(run_dir, "step-00000035")
    os.makedirs(fake)
    shutil.copy(os.path.join(ckpt(run_dir, "step-00000030"), "__0_0.distcp"), fake)

    train(run_dir, "--train.max_steps", "44")
    assert [e["location"] for e in events(run_dir, "skipped_incomplete")] == [fake]
    assert [e["step"] for e in events(run_dir, "resumed")] == [30]
    assert "step-00000035" not in step_dirs(ckpt(run_dir, ""))  # older than 44: pruned
    assert_bitwise_equal(reference, run_dir, "step-00000040")
    assert_bitwise_equal(reference, run_dir, "step-00000044")


def test_truncated_shard_makes_the_run_fall_back(reference, stopped_at_30, tmp_path):
    run_dir = copy_run(stopped_at_30, tmp_path)
    shard = os.path.join(ckpt(run_dir, "step-00000030"), "__1_0.distcp")
    os.truncate(shard, os.path.getsize(shard) - 100)

    train(run_dir, "--train.max_steps", "44")
    assert [e["step"] for e in events(run_dir, "resumed")] == [22]
    assert_bitwise_equal(reference, run_dir, "step-00000044")


def test_unloadable_checkpoint_falls_back_and_is_kept(reference, stopped_at_30, tmp_path):
    run_dir = copy_run(stopped_at_30, tmp_path)
    metadata = os.path.join(ckpt(run_dir, "step-00000030"), ".metadata")
    size = os.path.getsize(metadata)
    with open(metadata, "wb") as f:  # same size, so only loading can tell
        f.write(b"\0" * size)

    train(run_dir, "--train.max_steps", "44")
    failed = events(run_dir, "checkpoint_load_failed")
    assert [e["step"] for e in failed] == [30]
    assert [e["step"] for e in events(run_dir, "resumed")] == [22]
    assert os.path.exists(metadata), "a checkpoint that failed to load must not be deleted"
    assert_bitwise_equal(reference, run_dir, "step-00000044")


def test_retention_keeps_exactly_the_last_n_complete(tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, "--ckpt.keep_last", "2")
    assert step_dirs(ckpt(run_dir, "")) == ["step-00000060", FINAL]
    assert complete_steps(ckpt(run_dir, "")) == [60, 66]


def test_fp16_grad_scaler_state_is_restored_exactly(tmp_path):
    args = ("--train.precision", "fp16", "--train.max_steps", "6", "--ckpt.every_steps", "3",
            "--train.global_batch_size", "32")
    full, crashed = str(tmp_path / "full"), str(tmp_path / "crashed")
    train(full, *args)
    first = train(crashed, *args, env={"DDPTRAIN_TEST_FAULT": "kill_before_manifest@6"},
                  check=False)
    assert first.returncode != 0
    train(crashed, *args)
    assert [e["step"] for e in events(crashed, "resumed")] == [3]
    state = load_flat(ckpt(full, "step-00000006"))
    assert state["scaler._growth_tracker"] == 6 and state["scaler.scale"] > 1
    assert differences(state, load_flat(ckpt(crashed, "step-00000006"))) == []
