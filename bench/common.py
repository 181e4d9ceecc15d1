"""Shared pieces of the benchmark suite: launching torchrun, reading run files, results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Size:
    """How big and how long the benchmarks run."""

    name: str
    model: str = "resnet50"
    image_size: int = 32
    global_batch_size: int = 32
    reps: int = 5  # repetitions of every side-by-side comparison (B1, B5)
    b1_steps: int = 30  # steps per B1 run (the first 5 are warm-up)
    ckpt_reps: int = 8  # B2/B3/B6 repetitions (after one warm-up repetition)
    b4_run_s: float = 150.0  # training time of one B4 run
    b4_save_every_s: float = 60.0  # async save interval in B4
    b4_reps: int = 3

    def ddptrain_args(self) -> list[str]:
        """The model, data and batch every ddptrain launch of the suite uses."""
        return ["--model.name", self.model, "--data.image_size", str(self.image_size),
                "--train.global_batch_size", str(self.global_batch_size),
                "--train.eval_every_epochs", "1000", "--ckpt.at_epoch_end", "false",
                "--log.progress_bar", "off"]


SIZES = {
    "quick": Size("quick"),
    "full": Size("full", reps=7, b1_steps=60, ckpt_reps=15, b4_run_s=600.0, b4_reps=3),
}


@dataclass
class Result:
    """One row of the results table: subject vs reference, measured in the same run."""

    key: str
    measure: str
    subject: str
    reference: str
    unit: str = "s"
    subject_value: Optional[float] = None
    reference_value: Optional[float] = None
    goal: str = ""  # e.g. "<= 1.02" (on the ratio subject / reference)
    notes: str = ""
    samples: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        if self.subject_value is None or not self.reference_value:
            return None
        return self.subject_value / self.reference_value

    @property
    def met(self) -> Optional[bool]:
        if self.ratio is None or not self.goal:
            return None
        op, bound = self.goal.split()
        return self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def median(values: list[float]) -> float:
    return statistics.median(values)


def torchrun(args: list[str], log_path: str, nproc: int = 2, env: Optional[dict] = None,
             timeout: float = 7200) -> float:
    """Run ``python -m torch.distributed.run --standalone ... ARGS``; wall seconds.

    Raises RuntimeError with the end of the log when it fails.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    PYTHONPATH=os.pathsep.join(filter(None, [REPO,
                                                             os.environ.get("PYTHONPATH")])))
    full_env.update(env or {})
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                              cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-4000:]
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{tail}")
    return time.monotonic() - started


def ddptrain(run_dir: str, size: Size, *args: str) -> None:
    """One torchrun launch of ``python -m ddptrain`` with the suite's model and data."""
    torchrun(["-m", "ddptrain", "--run.dir", run_dir, *size.ddptrain_args(), *args],
             log_path=run_dir.rstrip("/") + ".log")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def events(run_dir: str, name: str) -> list[dict]:
    return [e for e in read_jsonl(os.path.join(run_dir, "events.jsonl"))
            if e["event"] == name]


def cpu_steal_seconds() -> Optional[float]:
    """CPU time the hypervisor gave to other guests so far, all CPUs (Linux
    /proc/stat; None elsewhere): a run that saw more of it was slowed from outside."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def step_times(rows: list[dict], warmup: int = 5) -> list[float]:
    """Seconds between consecutive per-step rows, skipping the first ``warmup`` steps."""
    rows = sorted(rows, key=lambda r: r["step"])
    return [b["time"] - a["time"] for a, b in zip(rows, rows[1:])
            if a["step"] >= warmup and b["step"] == a["step"] + 1]
