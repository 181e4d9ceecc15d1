"""A real, private, one-node Slurm cluster for tests (Slurm 22.05 / Debian 12).

Usage in a test module::

    from .slurmcluster import slurm_cluster  # noqa: F401  (registers the fixture)

    def test_x(slurm_cluster, tmp_path):
        script = slurm_cluster.write_script("job.sh", "#!/bin/bash\\necho hi\\n")
        jid = slurm_cluster.submit(script, sbatch_args=["-o", str(tmp_path / "out")])
        slurm_cluster.wait_state(jid, "COMPLETED", timeout=60)

(or put ``from .slurmcluster import slurm_cluster`` in tests/conftest.py;
importing it into several modules still starts only one cluster).

Everything lives in one temp dir (``cluster.root``): a freshly generated MUNGE
key, a private ``munged`` with its own socket, ``slurm.conf`` with free ports,
state/spool/log dirs.  ``slurmctld -D`` and ``slurmd -D`` run as child
processes.  ``SLURM_CONF`` is exported in ``os.environ`` for the fixture's
lifetime (restored afterwards) so *any* child process (sbatch, scontrol, the
code under test) talks to this cluster; ``cluster.env()`` gives the same
environment explicitly.  Nothing on the host (``/etc/munge``, ``/etc/slurm``,
system services) is read or changed.

Requirements: Linux, root, and the binaries from
``slurmctld slurmd slurm-client munge`` (see tests/slurm_install.sh).  Without
them the fixture skips, unless ``DDPTRAIN_REQUIRE_SLURM=1`` in which case it
fails (use that in CI, where slurm_install.sh ran).  ``SLURMCLUSTER_KEEP=1``
keeps the temp dir (logs) after the session.

Notes on Slurm 22.05 behaviour that tests must know about:

* A requeued job (``scontrol requeue``) goes back to PENDING with
  ``Reason=BeginTime`` and ``BeginTime = now + cred_expire + 1`` (120 s + 1 by
  default; ``AuthInfo=cred_expire``).  ``release_now(jid)``
  (``scontrol update jobid=J StartTime=now``) lets it run immediately.
* On the re-run ``SLURM_RESTART_COUNT`` is set (1, 2, ...) in the batch env;
  on the first run it is absent.  ``scontrol show job`` calls it ``Restarts``
  (``job_state()`` adds the alias ``RestartCnt``).
* ``scancel --signal=SIG --batch J`` signals only the batch shell (not its
  children); ``--full`` signals the shell and all its children (incl. srun
  steps).  Both go straight to slurmd, the job state is not changed.
* ``scontrol requeue J`` (also from inside the job itself) makes slurmctld
  kill the running job immediately: SIGCONT+SIGTERM to every process of the
  job, the batch shell included, SIGKILL after ``KillWait`` (5 s here).  So
  checkpoint *before* requeueing; a trap that must outlive the requeue
  should ``trap '' TERM`` first.  ``scontrol show job`` already shows
  PENDING / Reason=BeginTime / Restarts+1 while the old run is still
  finishing (squeue shows it COMPLETING for a moment); the re-run cannot
  start before the old one is gone, even after ``release_now``.
* Default ``--open-mode`` is truncate: the re-run truncates the ``-o`` file;
  use ``#SBATCH --open-mode=append`` to keep the first run's output.
* A bash trap runs only between commands: with a foreground child the trap
  waits for the child to exit.  Run the work as ``cmd & child=$!; wait
  $child``; ``wait`` returns (status 128+signal) as soon as a trapped signal
  arrives and the trap runs at once.
* Jobs are started by the backfill loop (``bf_interval=1``): submit ->
  running takes ~0.5-1 s; ``batch_sched_delay=0`` removes the default 3 s
  delay.  ``scontrol show job -o`` has no ``BeginTime`` key: the delayed
  start is in ``EligibleTime``/``StartTime`` (+ ``Reason=BeginTime``).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

try:  # pytest is optional for using the class directly
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

__all__ = [
    "SlurmCluster",
    "SlurmClusterError",
    "SlurmJobError",
    "slurm_cluster",
    "slurm_unavailable_reason",
    "acquire_shared_cluster",
    "release_shared_cluster",
    "TERMINAL_STATES",
]

# Job states after which a job does not change any more (unless requeued).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmClusterError(RuntimeError):
    """The cluster could not be started / a slurm command failed."""


class SlurmJobError(AssertionError):
    """A job reached an unexpected terminal state or timed out."""


def _which(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    for d in _SBIN_DIRS:
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    return None


def slurm_unavailable_reason() -> str | None:
    """Why a real cluster cannot run here, or None if it can."""
    if not os.uname().sysname == "Linux":
        return "real Slurm cluster tests need Linux"
    if os.geteuid() != 0:
        return "real Slurm cluster tests need root (slurmd runs jobs as root here)"
    missing = [b for b in _DAEMONS + _CLIENTS if _which(b) is None]
    if missing:
        return (
            "slurm/munge binaries not installed (missing: %s); run tests/slurm_install.sh"
            % ", ".join(missing)
        )
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        return s.getsockname()[1]


def _short_hostname() -> str:
    # Slurm uses gethostname() cut at the first dot.
    return socket.gethostname().split(".")[0]


def _parse_scontrol_oneliner(line: str) -> dict[str, str]:
    """Parse ``scontrol show job -o`` output (Key=Value Key=Value ...).

    Values may contain '=' (TRES=cpu=1,mem=1G) and, for a few fields like
    Command/WorkDir/StdOut with odd paths, spaces; a new key starts only at a
    space followed by ``Name=`` where Name looks like a scontrol key.
    """
    out: dict[str, str] = {}
    keys = list(re.finditer(r"(?:^|(?<=\s))([A-Za-z][A-Za-z0-9_/:]*)=", line))
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        out.setdefault(m.group(1), line[m.end() : end].strip())
    return out


class SlurmCluster:
    """Private one-node Slurm cluster (munged + slurmctld + slurmd)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        cpus: int | None = None,
        real_memory_mb: int = 1024,
        partition: str = "debug",
        cred_expire: int | None = None,
        kill_wait: int = 5,
        min_job_age: int = 300,
        extra_conf: str = "",
        debug: str = "info",
    ) -> None:
        reason = slurm_unavailable_reason()
        if reason:
            raise SlurmClusterError(reason)
        if root is None:
            # Not under pytest's tmp dir: /tmp/pytest-of-root is 0700 and munged
            # insists that every dir above its socket is world-executable.
            root = tempfile.mkdtemp(prefix="slurmcluster-", dir="/tmp")
            self._own_root = True
        else:
            Path(root).mkdir(parents=True, exist_ok=True)
            self._own_root = False
        self.root = Path(root).resolve()
        os.chmod(self.root, 0o755)
        self.hostname = _short_hostname()
        self.cpus = cpus or os.cpu_count() or 1
        self.real_memory_mb = real_memory_mb
        self.partition = partition
        self.cred_expire = cred_expire
        self.kill_wait = kill_wait
        self.min_job_age = min_job_age
        self.extra_conf = extra_conf
        self.debug = debug

        self.conf_path = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.state_dir = self.root / "state"
        self.spool_dir = self.root / "spool"
        self.scripts_dir = self.root / "scripts"
        self.ctld_port = 0
        self.slurmd_port = 0
        self.startup_seconds: float | None = None
        self.killed_leftovers: list[tuple[int, str]] = []  # filled by stop()

        self._procs: dict[str, subprocess.Popen] = {}
        self._daemon_logs: dict[str, object] = {}
        self._saved_slurm_conf: str | None = None
        self._exported = False
        self._started = False

    # ------------------------------------------------------------------ env
    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for slurm client commands / code under test.

        Starts from os.environ minus any SLURM_*/SBATCH_*/SALLOC_*/SRUN_*
        variables (e.g. when pytest itself runs inside a Slurm job), plus
        SLURM_CONF pointing at this cluster and the sbin dirs on PATH.
        """
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SCANCEL_", "SINFO_"))
        }
        env["SLURM_CONF"] = str(self.conf_path)
        path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
        for d in _SBIN_DIRS:
            if d not in path:
                path.append(d)
        env["PATH"] = os.pathsep.join(path)
        if extra:
            env.update(extra)
        return env

    # ------------------------------------------------------------- commands
    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a slurm client command against this cluster."""
        proc = subprocess.run(
            list(map(str, args)),
            env=self.env(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                "%s failed (rc=%s)\nstdout: %s\nstderr: %s"
                % (" ".join(map(str, args)), proc.returncode, proc.stdout, proc.stderr)
            )
        return proc

    # ----------------------------------------------------------- lifecycle
    def _write_files(self) -> None:
        for d in (self.log_dir, self.state_dir, self.spool_dir, self.scripts_dir):
            d.mkdir(parents=True, exist_ok=True)
        # munged requires the socket dir (and parents) world-executable, the
        # key file 0600/0400 owned by the daemon user.
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        (self.root / "plugstack.conf").write_text("")  # keep /etc/slurm/plugstack.conf out

        self.ctld_port = _free_port()
        self.slurmd_port = _free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = _free_port()
        authinfo = "socket=%s" % self.munge_socket
        if self.cred_expire is not None:
            authinfo += ",cred_expire=%d" % self.cred_expire
        r = self.root
        conf = f"""\
# generated by tests/slurmcluster.py
ClusterName=ddptest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo={authinfo}
StateSaveLocation={self.state_dir}
SlurmdSpoolDir={self.spool_dir}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug={self.debug}
SlurmdDebug={self.debug}
PlugStackConfig={r}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MaxJobCount=10000
MinJobAge={self.min_job_age}
KillWait={self.kill_wait}
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=120
SlurmdTimeout=300
{self.extra_conf}
NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")
        self._daemon_logs[name] = log
        self._procs[name] = subprocess.Popen(
            list(map(str, args)),
            env=self.env(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal signals from pytest's tty
        )

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise SlurmClusterError(
                    f"{name} exited early (rc={p.returncode})\n{self.log_tail()}"
                )

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if self._started:
            return self
        t0 = time.monotonic()
        self._write_files()
        atexit.register(self.stop)
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "-F",
                    "--force",
                    f"--key-file={self.munge_dir / 'munge.key'}",
                    f"--socket={self.munge_socket}",
                    f"--pid-file={self.munge_dir / 'munged.pid'}",
                    f"--log-file={self.log_dir / 'munged.log'}",
                    f"--seed-file={self.munge_dir / 'munged.seed'}",
                ],
            )
            self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf_path])
            self._wait(self._ctld_up, timeout, "slurmctld to answer scontrol ping")
            self._spawn(
                "slurmd", [_which("slurmd"), "-D", "-f", self.conf_path, "-N", self.hostname]
            )
            self._wait(self._node_idle, timeout, "node to become idle in sinfo")
        except BaseException:
            self.stop()
            raise
        self._export()
        self._started = True
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait(self, pred, timeout: float, what: str, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if pred():
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")
            time.sleep(poll)

    def _ctld_up(self) -> bool:
        p = self.run(["scontrol", "ping"], check=False, timeout=15)
        return p.returncode == 0 and "UP" in p.stdout

    def node_state(self) -> str:
        p = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=15)
        return p.stdout.strip() if p.returncode == 0 else ""

    def _node_idle(self) -> bool:
        return self.node_state() == "idle"

    def _export(self) -> None:
        if not self._exported:
            self._saved_slurm_conf = os.environ.get("SLURM_CONF")
            os.environ["SLURM_CONF"] = str(self.conf_path)
            self._exported = True

    def _unexport(self) -> None:
        if self._exported:
            if self._saved_slurm_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._saved_slurm_conf
            self._exported = False

    def _our_pids(self) -> list[int]:
        """Pids (other than ours) whose environment carries our SLURM_CONF.

        That is munged/slurmctld/slurmd, the slurmstepd's that slurmd forks
        (they are re-parented to init, so not in our process tree) and the job
        processes (sbatch exports SLURM_CONF into the job environment).
        """
        marker = b"SLURM_CONF=" + str(self.conf_path).encode() + b"\0"
        pids = []
        me = os.getpid()
        for ent in os.listdir("/proc"):
            if not ent.isdigit() or int(ent) == me:
                continue
            try:
                with open(f"/proc/{ent}/environ", "rb") as f:
                    if marker in f.read() + b"\0":
                        pids.append(int(ent))
            except OSError:
                continue
        return pids

    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, stop the daemons, kill leftovers, remove the dir."""
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover
            pass
        self._unexport()
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self.run(["scancel", "--user=root"], check=False, timeout=15)
                deadline = time.monotonic() + self.kill_wait + 10
                while time.monotonic() < deadline:
                    p = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15)
                    if p.returncode != 0 or not p.stdout.strip():
                        break
                    time.sleep(0.3)
            except Exception:
                pass
        # slurmd first (so it does not report the node down), then ctld, munged.
        for name in ("slurmd", "slurmctld", "munged"):
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout / 3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        # Stray slurmstepd / job processes: SIGKILL by pid.
        self.killed_leftovers = []
        for _ in range(3):
            pids = self._our_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed_leftovers.append((pid, comm))
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        for f in self._daemon_logs.values():
            try:
                f.close()  # type: ignore[attr-defined]
            except Exception:
                pass
        self._daemon_logs.clear()
        self._procs.clear()
        self._started = False
        if self._own_root and not os.environ.get("SLURMCLUSTER_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout", "slurmd.stdout"):
            p = self.log_dir / name
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # ---------------------------------------------------------------- jobs
    def write_script(self, name: str, text: str) -> Path:
        """Write an executable script under the cluster dir and return its path."""
        path = self.scripts_dir / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    def submit(
        self,
        script_path: str | os.PathLike,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        sbatch_args: Iterable[str] = (),
    ) -> int:
        """``sbatch --parsable [sbatch_args] script args...`` -> job id.

        ``env`` is added on top of ``self.env()``; sbatch exports the whole
        environment (default --export=ALL), so it reaches the job.  ``cwd``
        is the submit dir (the job's working dir, where slurm-%j.out goes).
        """
        p = self.run(
            ["sbatch", "--parsable", *sbatch_args, str(script_path), *args],
            env=env,
            cwd=cwd,
        )
        return int(p.stdout.strip().split(";")[0])

    def job_state(self, job_id: int | str) -> dict[str, str] | None:
        """``scontrol show job -o J`` as a dict, or None if slurmctld forgot it.

        Useful keys: JobState, Reason, Restarts (alias RestartCnt), BatchFlag,
        Requeue, BeginTime, StartTime, EndTime, ExitCode, RunTime, StdOut.
        """
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if p.returncode != 0 or not p.stdout.strip():
            if "Invalid job id" in p.stderr:
                return None
            raise SlurmClusterError(f"scontrol show job {job_id} failed: {p.stderr.strip()}")
        d = _parse_scontrol_oneliner(p.stdout.strip().splitlines()[0])
        if "Restarts" in d:
            d.setdefault("RestartCnt", d["Restarts"])
        return d

    def wait_state(
        self,
        job_id: int | str,
        states: str | Iterable[str],
        timeout: float = 60,
        *,
        poll: float = 0.2,
        fail_states: Iterable[str] | None = None,
        predicate=None,
    ) -> dict[str, str]:
        """Poll until JobState is in ``states`` (and ``predicate(info)`` holds).

        Raises SlurmJobError on timeout, or as soon as the job is in one of
        ``fail_states`` (default: the terminal states not in ``states``).
        Returns the job_state() dict.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        bad = set(TERMINAL_STATES - wanted) if fail_states is None else set(fail_states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] | None = None
        while True:
            info = self.job_state(job_id)
            st = info.get("JobState") if info else None
            if st in wanted and (predicate is None or predicate(info)):
                return info  # type: ignore[return-value]
            if st in bad:
                raise SlurmJobError(
                    f"job {job_id} reached {st} while waiting for {sorted(wanted)}: {info}\n{self.log_tail(15)}"
                )
            if time.monotonic() > deadline:
                raise SlurmJobError(
                    f"timed out after {timeout}s waiting for job {job_id} to be {sorted(wanted)}; "
                    f"last: {info}\n{self.log_tail(15)}"
                )
            time.sleep(poll)

    def signal_batch(self, job_id: int | str, sig: str | int = "USR1", *, full: bool = False) -> None:
        """``scancel --signal=SIG --batch J`` (shell only) or ``--full`` (shell + children)."""
        if isinstance(sig, int):
            sig = str(sig)
        self.run(["scancel", f"--signal={sig}", "--full" if full else "--batch", str(job_id)])

    def signal_steps(self, job_id: int | str, sig: str | int = "USR1") -> None:
        """``scancel --signal=SIG J``: all job steps (srun), not the batch shell."""
        self.run(["scancel", f"--signal={sig}", str(job_id)])

    def release_now(self, job_id: int | str) -> None:
        """Make a requeued (BeginTime-delayed) job eligible right now."""
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])

    def requeue(self, job_id: int | str, *, hold: bool = False) -> None:
        self.run(["scontrol", "requeuehold" if hold else "requeue", str(job_id)])

    def release(self, job_id: int | str) -> None:
        """``scontrol release`` a held job."""
        self.run(["scontrol", "release", str(job_id)])

    def cancel(self, job_id: int | str) -> None:
        self.run(["scancel", str(job_id)], check=False)

    def cancel_all(self, wait: bool = True, timeout: float | None = None) -> None:
        """Cancel every job and (optionally) wait until squeue is empty."""
        self.run(["scancel", "--user=root"], check=False)
        if not wait:
            return
        deadline = time.monotonic() + (timeout if timeout is not None else self.kill_wait + 15)
        while self.queue() and time.monotonic() < deadline:
            time.sleep(0.2)

    @staticmethod
    def wait_for_text(path: str | os.PathLike, text: str, timeout: float = 30, poll: float = 0.1) -> str:
        """Wait until file ``path`` exists and contains ``text``; return its content."""
        deadline = time.monotonic() + timeout
        path = Path(path)
        content = ""
        while True:
            if path.exists():
                content = path.read_text(errors="replace")
                if text in content:
                    return content
            if time.monotonic() > deadline:
                raise SlurmJobError(f"timed out after {timeout}s waiting for {text!r} in {path}; content: {content!r}")
            time.sleep(poll)

    def queue(self) -> list[dict[str, str]]:
        """Active jobs: [{'JobId', 'State', 'Reason'}] from squeue."""
        p = self.run(["squeue", "-h", "-o", "%i|%T|%r"])
        rows = []
        for line in p.stdout.splitlines():
            jid, st, reason = line.split("|", 2)
            rows.append({"JobId": jid, "State": st, "Reason": reason})
        return rows


_shared: SlurmCluster | None = None
_shared_users = 0


def acquire_shared_cluster() -> SlurmCluster:
    """Start (once per process) and return the shared cluster; pair with release."""
    global _shared, _shared_users
    if _shared is None:
        cluster = SlurmCluster()
        cluster.start()
        _shared = cluster
    _shared_users += 1
    return _shared


def release_shared_cluster() -> None:
    global _shared, _shared_users
    _shared_users -= 1
    if _shared_users <= 0 and _shared is not None:
        try:
            _shared.stop()
        finally:
            _shared, _shared_users = None, 0


if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """Session-wide real one-node Slurm cluster (skips if unavailable).

        Safe to import into several test modules (or a conftest.py): all of
        them share one cluster, stopped after the last user's teardown.
        """
        reason = slurm_unavailable_reason()
        if reason:
            if os.environ.get("DDPTRAIN_REQUIRE_SLURM") == "1":
                pytest.fail(f"DDPTRAIN_REQUIRE_SLURM=1 but {reason}")
            pytest.skip(reason)
        cluster = acquire_shared_cluster()
        try:
            yield cluster
        finally:
            release_shared_cluster()
