"""Launching real training runs (torchrun or one process) from tests, and reading results."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

#: Small but real: 3 epochs of the embedded digits = 66 steps of 64 samples.
STEPS_PER_EPOCH = 22
FAST_ARGS = ["--train.epochs", "3", "--log.every_steps", "1", "--ckpt.every_steps", "10",
             "--ckpt.keep_last", "100", "--log.sample_ids", "true",
             "--log.progress_bar", "off"]


def _env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("DDPTRAIN_TEST_FAULT", None)
    env.update(extra or {})
    return env


def command(run_dir: str, *args: str, nproc: int = 2, fast: bool = True,
            torchrun_args: tuple[str, ...] = ()) -> list[str]:
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", *torchrun_args, "-m", "ddptrain"]
    else:
        launcher = [sys.executable, "-m", "ddptrain"]
    return [*launcher, "--run.dir", run_dir, *(FAST_ARGS if fast else []), *args]


def train(run_dir: str, *args: str, nproc: int = 2, env: Optional[dict] = None,
          timeout: float = 600, check: bool = True, fast: bool = True,
          torchrun_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run training to the end; with ``check`` fail the test (showing the log) on error."""
    proc = subprocess.run(command(run_dir, *args, nproc=nproc, fast=fast,
                                  torchrun_args=torchrun_args),
                          env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def start(run_dir: str, *args: str, nproc: int = 2, env: Optional[dict] = None,
          log_path: Optional[str] = None, torchrun_args: tuple[str, ...] = ()
          ) -> subprocess.Popen:
    """Start training in its own process group (so the whole group can be signalled)."""
    out = open(log_path or os.path.join(os.path.dirname(run_dir.rstrip("/")),
                                        os.path.basename(run_dir) + ".log"), "ab")
    return subprocess.Popen(command(run_dir, *args, nproc=nproc,
                                    torchrun_args=torchrun_args),
                            env=_env(env), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (torchrun starts each worker in its own session, so
    a process-group kill does not reach them)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = []
        # Every thread's children: DCP's helper process is started from a rank's
        # checkpoint launcher thread, not from its main thread.
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(task) as f:
                    children += [int(c) for c in f.read().split()]
            except OSError:
                pass
        found += children
        todo += children
    return found


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the launcher and every process below it (all ranks, all workers)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_until(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):  # a killed writer may leave a partial last line
                rows.append(json.loads(line))
    return rows


def train_rows(run_dir: str) -> dict[int, dict]:
    """The last logged train row of every step (a restarted run re-logs later steps)."""
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if r["kind"] == "train"]
    return {r["step"]: r for r in rows}


def events(run_dir: str, name: Optional[str] = None) -> list[dict]:
    rows = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    return [r for r in rows if name is None or r["event"] == name]


def sample_ids(run_dir: str, nproc: int = 2) -> dict[int, list[int]]:
    """Step -> the global batch's sample indices (rank 0's slice, then rank 1's, ...),
    keeping the last record of each step."""
    per_rank = []
    for rank in range(nproc):
        rows = read_jsonl(os.path.join(run_dir, f"samples-rank{rank}.jsonl"))
        per_rank.append({r["step"]: r["indices"] for r in rows})
    steps = sorted(per_rank[0])
    return {s: [i for rank_rows in per_rank for i in rank_rows[s]] for s in steps}


def step_dirs(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-"))


def complete_steps(ckpt_dir: str) -> list[int]:
    return [int(n.split("-")[1]) for n in step_dirs(ckpt_dir)
            if os.path.exists(os.path.join(ckpt_dir, n, "manifest.json"))]


def make_digit_imagefolder(root: str, per_class: int = 30, size: int = 16,
                           with_splits: bool = False) -> str:
    """An ImageFolder tree of real PNG files made from scikit-learn's digits."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target):
        label = int(label)
        if counts.get(label, 0) >= per_class:
            continue
        index = counts[label] = counts.get(label, 0) + 1
        split = ("val" if index % 5 == 0 else "train") if with_splits else ""
        folder = os.path.join(root, split, f"digit{label}")
        os.makedirs(folder, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size)).save(
            os.path.join(folder, f"{index:04d}.png"))
    return root


def tree_fingerprint(root: str) -> dict[str, bytes]:
    """Path -> content of every file below ``root`` (to prove nothing was changed)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found
