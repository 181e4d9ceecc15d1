"""slurm/*.sbatch on a real one-node Slurm cluster: USR1 -> checkpoint -> requeue ->
resume -> done, with final weights bitwise equal to an uninterrupted run. The multi-node
script runs on one node here (srun + c10d rendezvous all the same)."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from tests.launch import FAST_ARGS, events, train_rows
from tests.preempt_common import (ONLY_STOP_SAVES, assert_resumed_without_recompute,
                                  assert_stopped_at_step_boundary, status)
from tests.slurmcluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def wait_for_step(cluster: SlurmCluster, job_id: int, run_dir: str, step: int,
                  timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(train_rows(run_dir), default=0) < step:
        state = cluster.job_state(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} {state} before step {step}"
        assert time.monotonic() < deadline, f"timed out waiting for step {step}"
        time.sleep(0.05)


def wait_until_old_run_is_gone(cluster: SlurmCluster, job_id: int) -> None:
    """Until squeue shows the requeued job PENDING, no longer COMPLETING; then into the
    next whole second: slurmd revokes the old run's credential with a timestamp in
    seconds, and a re-run launched within that same second is killed as revoked."""
    deadline = time.monotonic() + 60
    while [r for r in cluster.queue() if r["JobId"] == str(job_id)
           and r["State"] != "PENDING"]:
        assert time.monotonic() < deadline, "the requeued run never finished"
        time.sleep(0.1)
    time.sleep(1.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["train.sbatch", "train-multinode.sbatch"])
def test_usr1_requeues_then_the_rerun_resumes_and_completes(
        slurm_cluster, reference_run, tmp_path, script):  # noqa: F811 (fixture)
    cluster = slurm_cluster
    run_dir, out = str(tmp_path / "run"), tmp_path / "job.out"
    env = {"RUN_DIR": run_dir, "PYTHON": sys.executable, "NPROC_PER_NODE": "2",
           "SHUTDOWN_TIMEOUT": "60", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "RDZV_PORT": str(free_port())}
    job = cluster.submit(os.path.join(REPO, "slurm", script), *FAST_ARGS, *ONLY_STOP_SAVES,
                         env=env, cwd=tmp_path, sbatch_args=["-o", str(out), "--job-name",
                                                             "ddptest", "--nodes", "1"])
    try:
        wait_for_step(cluster, job, run_dir, 26)
        cluster.signal_batch(job, "USR1")  # what --signal=B:USR1@grace delivers
        info = cluster.wait_state(job, "PENDING", timeout=120,
                                  predicate=lambda d: d.get("Reason") == "BeginTime")
        assert info["Restarts"] == "1", info
        cluster.wait_for_text(out, "ddptrain: requeueing job", timeout=30)
        stop_step = assert_stopped_at_step_boundary(run_dir, "SIGUSR1")

        wait_until_old_run_is_gone(cluster, job)
        cluster.release_now(job)
        info = cluster.wait_state(job, "COMPLETED", timeout=300)
        assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info  # not requeued
    finally:
        cluster.cancel(job)

    assert_resumed_without_recompute(run_dir, stop_step, reference_run)
    started = events(run_dir, "run_started")
    assert [e["slurm_job_id"] for e in started] == [str(job)] * 2
    assert [e["slurm_restart_count"] for e in started] == [None, "1"]
    assert status(run_dir)["slurm_job_id"] == str(job)
    log = out.read_text()
    assert f"ddptrain: job {job} restart 0 " in log
    assert f"ddptrain: job {job} restart 1 " in log
    assert "training state: preempted" in log and "training state: finished" in log
