"""Smoke tests for the real one-node Slurm fixture (tests/slurmcluster.py).

They need root + slurm/munge (tests/slurm_install.sh); otherwise they skip.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

try:  # tests/ is a package (tests/__init__.py)
    from .slurmcluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)
except ImportError:  # rootdir-less layout / --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurmcluster import SlurmCluster, slurm_cluster  # noqa: F401


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_trivial_job_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    print(f"\n[slurm] cluster started in {slurm_cluster.startup_seconds:.2f}s at {slurm_cluster.root}")
    script = _write(
        tmp_path / "hello.sh",
        "#!/bin/bash\n"
        "#SBATCH --job-name=hello\n"
        'echo "hello from job $SLURM_JOB_ID on $(hostname) restart=${SLURM_RESTART_COUNT-unset} arg=$1"\n',
    )
    out = tmp_path / "hello.out"
    t0 = time.monotonic()
    jid = slurm_cluster.submit(script, "xyz", cwd=tmp_path, sbatch_args=["-o", str(out)])
    info = slurm_cluster.wait_state(jid, "COMPLETED", timeout=60)
    print(f"[slurm] trivial job {jid}: submit->COMPLETED {time.monotonic() - t0:.2f}s")
    assert info["ExitCode"] == "0:0"
    assert info["BatchFlag"] == "1"
    assert info["Restarts"] == info["RestartCnt"] == "0"
    assert info["WorkDir"] == str(tmp_path)
    text = out.read_text()
    assert f"hello from job {jid} on " in text
    assert "restart=unset arg=xyz" in text  # SLURM_RESTART_COUNT absent on a first run


# The pattern a preemptible training job uses. Points that matter:
#  * the long-running work is a *background* child and the shell sits in
#    `wait $!`: bash runs a trap only between commands, so with a foreground
#    child (plain `python train.py`) the USR1 trap would wait until the child
#    exits; `wait` instead returns at once (status 128+10) when the trapped
#    signal arrives, and the trap runs immediately;
#  * `scontrol requeue` on a running job makes slurmctld kill the whole job at
#    once (SIGCONT+SIGTERM to every process of the job, SIGKILL after
#    KillWait), the batch shell included: so the trap ignores TERM and does
#    its work (checkpoint) *before* calling requeue;
#  * `--open-mode=append`, else the re-run truncates the -o file;
#  * the re-run sees SLURM_RESTART_COUNT=1 (unset on the first run).
REQUEUE_SCRIPT = r"""#!/bin/bash
#SBATCH --job-name=requeue-smoke
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --time=10:00
#SBATCH --open-mode=append
log="$1"
echo "stdout: run restart=${SLURM_RESTART_COUNT-unset}"
if [ -n "$SLURM_RESTART_COUNT" ]; then
    echo "second run restart=$SLURM_RESTART_COUNT" >> "$log"
    exit 0
fi
on_usr1() {
    trap '' TERM            # survive the SIGTERM that the requeue sends us
    echo "got USR1" >> "$log"
    kill "$child" 2>/dev/null   # (a trainer would checkpoint here)
    scontrol requeue "$SLURM_JOB_ID"
    echo "requeue rc=$?" >> "$log"
    exit 0
}
trap on_usr1 USR1
sleep 600 &
child=$!
echo "ready pid=$$" >> "$log"
wait "$child"
echo "wait returned without trap rc=$?" >> "$log"
"""


def test_usr1_trap_requeues_and_restart_count(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    c = slurm_cluster
    script = _write(tmp_path / "requeue.sh", REQUEUE_SCRIPT)
    log = tmp_path / "requeue.log"
    out = tmp_path / "requeue.out"
    t0 = time.monotonic()
    jid = c.submit(script, str(log), cwd=tmp_path, sbatch_args=["-o", str(out)])
    try:
        c.wait_for_text(log, "ready", timeout=60)  # trap installed, child running
        t_run = time.monotonic()
        info = c.job_state(jid)
        assert info is not None and info["JobState"] == "RUNNING", info
        assert info["Requeue"] == "1" and info["BatchFlag"] == "1"

        c.signal_batch(jid, "USR1")  # scancel --signal=USR1 --batch JOBID
        info = c.wait_state(
            jid, "PENDING", timeout=30, predicate=lambda d: d.get("Reason") == "BeginTime"
        )
        t_requeued = time.monotonic()
        # Requeued: Restarts already bumped, held back by BeginTime (= now +
        # cred_expire(120s) + 1), not by a hold.
        assert info["Restarts"] == info["RestartCnt"] == "1", info
        eligible = dt.datetime.fromisoformat(info["EligibleTime"])
        assert eligible > dt.datetime.now() + dt.timedelta(seconds=60), info
        text = c.wait_for_text(log, "requeue rc=", timeout=30)
        assert "got USR1" in text and "requeue rc=0" in text, text
        assert "wait returned without trap" not in text, text
        # Nothing starts it on its own for ~2 minutes.
        time.sleep(2)
        assert c.job_state(jid)["JobState"] == "PENDING"

        c.release_now(jid)  # scontrol update jobid=J StartTime=now
        t_rel = time.monotonic()
        info = c.wait_state(jid, "COMPLETED", timeout=60)
        t_done = time.monotonic()
        print(
            f"\n[slurm] requeue job {jid}: submit->running {t_run - t0:.2f}s, "
            f"USR1->PENDING(BeginTime) {t_requeued - t_run:.2f}s, "
            f"release->COMPLETED {t_done - t_rel:.2f}s"
        )
        assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
        text = log.read_text()
        assert "second run restart=1" in text, text
        stdout = out.read_text()
        assert "stdout: run restart=unset" in stdout, stdout  # kept thanks to --open-mode=append
        assert "stdout: run restart=1" in stdout, stdout
    finally:
        c.cancel(jid)


SIGNAL_SCOPE_SCRIPT = r"""#!/bin/bash
log="$1"
trap 'echo "shell got USR1" >> "$log"' USR1
bash -c 'trap "echo child got USR1 >> \"$1\"" USR1; echo child-ready >> "$1"; while :; do sleep 0.1; done' child "$log" &
child=$!
while :; do wait "$child"; done
"""


def test_scancel_batch_vs_full(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """--batch: batch shell only; --full: shell and its children."""
    c = slurm_cluster
    script = _write(tmp_path / "scope.sh", SIGNAL_SCOPE_SCRIPT)
    log = tmp_path / "scope.log"
    jid = c.submit(script, str(log), cwd=tmp_path, sbatch_args=["-o", str(tmp_path / "scope.out")])
    try:
        c.wait_for_text(log, "child-ready", timeout=60)
        c.signal_batch(jid, "USR1")
        c.wait_for_text(log, "shell got USR1", timeout=10)
        time.sleep(1)
        assert "child got USR1" not in log.read_text()
        c.signal_batch(jid, "USR1", full=True)
        text = c.wait_for_text(log, "child got USR1", timeout=10)
        assert text.count("shell got USR1") >= 2, text
        assert c.job_state(jid)["JobState"] == "RUNNING"  # signals do not end it
    finally:
        c.cancel(jid)
    c.wait_state(jid, "CANCELLED", timeout=30)
