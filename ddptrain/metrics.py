"""Step lines, JSON-lines metrics and events, TensorBoard and the progress bar (rank 0)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Optional

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
_IMPORTED_AT = time.monotonic()


def seconds_since_process_start() -> float:
    """Seconds since the OS started this process (Linux; elsewhere: since this module was
    imported, which misses the interpreter start and some imports)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22, start time in clock ticks since boot; the name (field 2) may
            # contain spaces, so count from its closing parenthesis.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED_AT


class _JsonLines:
    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class RunLogger:
    """Everything a run reports. Only rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, run_dir: str, is_main: bool, total_steps: int,
                 progress_bar: str = "auto", tensorboard: bool = False):
        self.is_main = is_main
        self.total_steps = total_steps
        self.metrics: Optional[_JsonLines] = None
        self.events: Optional[_JsonLines] = None
        self.tb = None
        self.bar: Optional[tqdm] = None
        self._redirect = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.metrics = _JsonLines(os.path.join(run_dir, METRICS_FILE))
        self.events = _JsonLines(os.path.join(run_dir, EVENTS_FILE))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        show_bar = progress_bar == "on" or (progress_bar == "auto" and sys.stderr.isatty())
        if show_bar:
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
            # The package's console log lines go through tqdm.write so they do not tear
            # the bar; each line is printed once, by logging.
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("ddptrain")])
            self._redirect.__enter__()

    def event(self, name: str, level: int = logging.INFO, message: str = "",
              **fields: Any) -> None:
        """Log an event and append it to events.jsonl."""
        if not self.is_main:
            return
        details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        log.log(level, "%s%s%s", name, f": {message}" if message else "",
                f" ({details})" if details else "")
        self.events.write({"event": name, "time": time.time(), "level":
                           logging.getLevelName(level), "message": message, **fields})

    def start_at(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train_step(self, *, step: int, epoch: int, loss: float, lr: float,
                   images_per_s: float, data_wait: float) -> None:
        if not self.is_main:
            return
        line = (f"step {step}/{self.total_steps} | epoch {epoch} | loss {loss:.4f} | "
                f"lr {lr:.3e} | {images_per_s:,.0f} img/s | data wait {data_wait:.0%}")
        log.info("%s", line)
        self.metrics.write({"kind": "train", "step": step, "epoch": epoch, "loss": loss,
                            "lr": lr, "images_per_s": images_per_s, "data_wait": data_wait,
                            "time": time.time()})
        if self.tb is not None:
            for key, value in (("loss", loss), ("lr", lr), ("images_per_s", images_per_s),
                               ("data_wait", data_wait)):
                self.tb.add_scalar(f"train/{key}", value, step)

    def eval_result(self, *, step: int, epoch: int, loss: float, top1: float, top5: float,
                    samples: int) -> None:
        if not self.is_main:
            return
        log.info("eval after epoch %d (step %d): loss %.4f | top-1 %.2f%% | top-5 %.2f%% | "
                 "%d samples", epoch, step, loss, 100 * top1, 100 * top5, samples)
        self.metrics.write({"kind": "eval", "step": step, "epoch": epoch, "loss": loss,
                            "top1": top1, "top5": top5, "samples": samples,
                            "time": time.time()})
        if self.tb is not None:
            for key, value in (("loss", loss), ("top1", top1), ("top5", top5)):
                self.tb.add_scalar(f"val/{key}", value, step)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        for closeable in (self.bar, self.tb, self.metrics, self.events):
            if closeable is not None:
                closeable.close()


class SampleRecorder:
    """Optional per-rank record of the sample indices each step consumed (for audits)."""

    def __init__(self, run_dir: str, rank: int, enabled: bool):
        self.out = _JsonLines(os.path.join(run_dir, f"samples-rank{rank}.jsonl")) \
            if enabled else None

    @property
    def enabled(self) -> bool:
        return self.out is not None

    def record(self, step: int, epoch: int, indices: list[int]) -> None:
        if self.out is not None:
            self.out.write({"step": step, "epoch": epoch, "indices": indices})

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
