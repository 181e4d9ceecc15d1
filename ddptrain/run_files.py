"""The files a run keeps beside its checkpoints for scripts and people: ``status.json``
(how the latest attempt ended, with its exit code) and ``config.yaml`` (the resolved
config), both replaced atomically; and the check that ``run.dir`` takes files."""

from __future__ import annotations

import json
import os
import tempfile
import time
from enum import IntEnum
from typing import Any

from ddptrain.config import ConfigError

STATUS_FILE = "status.json"


class ExitCode(IntEnum):
    """Process exit status, for scripts (see README)."""

    FINISHED = 0
    FAILED = 1
    BAD_INPUT = 2
    PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a complete checkpoint; rerun


STATUS_EXIT_CODES = {"finished": ExitCode.FINISHED, "preempted": ExitCode.PREEMPTED,
                     "bad_input": ExitCode.BAD_INPUT, "failed": ExitCode.FAILED}


def write_status(run_dir: str, state: str, **fields: Any) -> None:
    """Atomically replace ``<run_dir>/status.json``: how the latest attempt ended
    (running | finished | preempted | bad_input | failed) for launch scripts, which cannot
    rely on torchrun's exit status (see README, Exit status)."""
    row = {"state": state, "exit_code": STATUS_EXIT_CODES.get(state), **fields,
           "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "time_unix": time.time()}
    os.makedirs(run_dir, exist_ok=True)
    replace_file(os.path.join(run_dir, STATUS_FILE), json.dumps(row) + "\n")


def write_resolved_config(run_dir: str, resolved: dict[str, Any]) -> None:
    """``<run_dir>/config.yaml``: the config this run trains with (secrets redacted)."""
    import yaml

    replace_file(os.path.join(run_dir, "config.yaml"),
                 yaml.safe_dump(resolved, sort_keys=False))


def replace_file(path: str, text: str) -> None:
    """Write ``text`` to a temp file, fsync it and rename it over ``path`` (atomic)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def check_run_dir(run_dir: str) -> None:
    """``run.dir`` exists (or is created) and takes files; ConfigError naming it if not."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"run.dir={run_dir!r} is not a writable directory ({exc}); "
                          "choose another --run.dir") from exc
