#!/usr/bin/env python3
"""Run ddptrain under torchrun until training reports completion (preemptible machines).

    python launch/supervise.py --run-dir /shared/runs/r1 --nproc-per-node 8 -- \\
        --config my.yaml --preempt.notice aws

builds and runs

    PYTHON -m torch.distributed.run --standalone --nproc-per-node 8 --max-restarts 3 \\
        --signals-to-handle SIGTERM,SIGUSR1,SIGUSR2 --shutdown-timeout 120 \\
        -m ddptrain --config my.yaml --preempt.notice aws --run.dir /shared/runs/r1

and decides from ``<run-dir>/status.json`` (not torchrun's exit status, which is 0 or 1)
what to do when torchrun exits (ddptrain's arguments are parsed and validated once before
the first attempt: bad ones exit 2 without starting torchrun):

* ``finished``: exit 0.
* ``bad_input``: exit 2 (rerunning cannot help).
* ``preempted`` after a stop that came from inside the run (a provider's preemption
  notice, a signal sent to the ranks): rerun after ``--retry-delay``. If the machine is
  going away it goes away; if not (a false alarm), training simply continues.
* anything else (a crash that torchrun's own restarts did not cure): rerun, at most
  ``--max-failures`` times in a row.

A SIGTERM, SIGINT, SIGHUP, SIGUSR1 or SIGUSR2 sent to the supervisor is forwarded to
torchrun once (SIGINT and SIGHUP as SIGTERM), so the ranks commit a checkpoint and stop;
the supervisor then exits 75 (preempted) or 1 without rerunning. Further signals are
ignored: torchrun abandons its workers when signalled twice. torchrun runs in its own
session, so a Ctrl-C in the terminal reaches only the supervisor.

Start the same command again after a reboot or on a new machine (e.g. from systemd with
``KillMode=mixed`` so that only the supervisor gets the stop signal): it resumes from the
newest complete checkpoint. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

STATUS_FILE = "status.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGUSR2)
#: torchrun forwards these to the ranks (see --signals-to-handle below).
FORWARDED_AS_IS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 75


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [supervise] {message}", file=sys.stderr, flush=True)


def read_state(run_dir: str) -> str:
    """The ``state`` in status.json, or ``missing`` / ``unreadable``."""
    try:
        with open(os.path.join(run_dir, STATUS_FILE), encoding="utf-8") as f:
            return str(json.load(f)["state"])
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


def torchrun_command(args: argparse.Namespace) -> list[str]:
    return [args.python, "-m", "torch.distributed.run", *shlex.split(args.torchrun_args),
            f"--nproc-per-node={args.nproc_per_node}",
            f"--max-restarts={args.max_restarts}",
            "--signals-to-handle=SIGTERM,SIGUSR1,SIGUSR2",
            f"--shutdown-timeout={args.shutdown_timeout}", "-m", "ddptrain",
            *args.ddptrain_args, "--run.dir", args.run_dir]


class Supervisor:
    def __init__(self, command: list[str], run_dir: str, retry_delay: float,
                 max_failures: int):
        self.command = command
        self.run_dir = run_dir
        self.retry_delay = retry_delay
        self.max_failures = max_failures
        self.child: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None
        self.forwarded_to: Optional[int] = None
        self.stopped = threading.Event()

    def on_signal(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            say(f"got {name} again; still waiting for the checkpoint (kill -9 to abort)")
            return
        self.stop_signal = signum
        self.stopped.set()
        say(f"got {name}: asking training to checkpoint and stop")
        self.forward()

    def forward(self) -> None:
        """Pass the stop signal to torchrun, once per torchrun."""
        child = self.child
        if child is None or child.poll() is not None or self.forwarded_to == child.pid:
            return
        self.forwarded_to = child.pid
        signum = self.stop_signal if self.stop_signal in FORWARDED_AS_IS else signal.SIGTERM
        os.kill(child.pid, signum)

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.on_signal)
        failures = attempt = 0
        while self.stop_signal is None:
            attempt += 1
            state = self.run_once(attempt)
            if state == "finished":
                return EXIT_FINISHED
            if state == "bad_input":
                return EXIT_BAD_INPUT
            if self.stop_signal is not None:
                return EXIT_PREEMPTED if state == "preempted" else EXIT_FAILED
            failures = 0 if state == "preempted" else failures + 1
            if failures >= self.max_failures:
                say(f"giving up after {failures} failed attempts in a row")
                return EXIT_FAILED
            say(f"training not finished (state {state}); "
                f"rerunning in {self.retry_delay:g}s")
            if self.stopped.wait(self.retry_delay):
                return EXIT_PREEMPTED if state == "preempted" else EXIT_FAILED
        return EXIT_FAILED  # stopped before the first attempt

    def run_once(self, attempt: int) -> str:
        # A stale status.json must not describe this attempt if it dies before writing one.
        try:
            os.remove(os.path.join(self.run_dir, STATUS_FILE))
        except FileNotFoundError:
            pass
        say(f"attempt {attempt}: {shlex.join(self.command)}")
        env = dict(os.environ)
        # A fresh rendezvous store per torchrun restart (see README, torchrun).
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        self.child = subprocess.Popen(self.command, env=env, start_new_session=True)
        if self.stop_signal is not None:  # arrived while starting: pass it on now
            self.forward()
        code = self.child.wait()
        state = read_state(self.run_dir)
        say(f"attempt {attempt}: torchrun exited {code}, training state {state}")
        return state


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rerun ddptrain under torchrun until training reports completion.",
        epilog="Arguments after -- go to ddptrain; --run.dir is appended from --run-dir.")
    parser.add_argument("--run-dir", required=True,
                        help="ddptrain's run.dir (holds status.json)")
    parser.add_argument("--nproc-per-node", default="1",
                        help="ranks per machine: a number, gpu or auto (torchrun)")
    parser.add_argument("--python", default=sys.executable,
                        help="python with ddptrain installed (default: this one)")
    parser.add_argument("--torchrun-args", default="--standalone",
                        help="rendezvous arguments for torchrun (default: --standalone)")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="torchrun --max-restarts: in-place restarts after a crash")
    parser.add_argument("--shutdown-timeout", type=int, default=120,
                        help="seconds torchrun gives the ranks to save before SIGKILL")
    parser.add_argument("--retry-delay", type=float, default=10.0,
                        help="seconds between an attempt and the next one")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="give up after this many failed attempts in a row")
    parser.add_argument("ddptrain_args", nargs=argparse.REMAINDER,
                        help="-- then arguments for ddptrain")
    args = parser.parse_args(argv)
    if args.ddptrain_args[:1] == ["--"]:
        args.ddptrain_args = args.ddptrain_args[1:]
    if args.max_failures < 1:
        parser.error("--max-failures must be >= 1")
    return args


#: Parses and validates ddptrain's arguments exactly as a rank would, without training.
CHECK_CONFIG = """import sys
from ddptrain.config import ConfigError, parse_config
try:
    parse_config(sys.argv[1:])
except ConfigError as exc:
    sys.exit(f"error: {exc}")
"""


def check_arguments(args: argparse.Namespace) -> bool:
    """A bad ddptrain argument fails before any rank starts, and writes no status.json:
    find it once here instead of rerunning torchrun on it until --max-failures."""
    proc = subprocess.run([args.python, "-c", CHECK_CONFIG, *args.ddptrain_args,
                           "--run.dir", args.run_dir], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        say("ddptrain rejected its arguments (above); not starting training")
    return proc.returncode == 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not check_arguments(args):
        return EXIT_BAD_INPUT
    supervisor = Supervisor(torchrun_command(args), args.run_dir, args.retry_delay,
                            args.max_failures)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
