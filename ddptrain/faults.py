"""Test-only fault injection for the checkpoint path, switched on by one environment
variable: ``DDPTRAIN_TEST_FAULT=POINT@STEP``. Unset (always, outside tests) it does nothing.

Points:

* ``kill_before_manifest``: SIGKILL every rank after the shards and ``.metadata`` of that
  step's save are written but before the manifest (for an async save: when its
  background write has finished, while training has moved on).
* ``delay_save``: that step's write starts :data:`TEST_DELAY_S` late (in the background
  for an async save, so training runs on while the save is pending).
* ``fail_save``: that step's write fails on the last rank.
* ``kill_async_helper``: before the async save of that step, the last rank's DCP helper
  process (``ckpt.async_mode process``) is killed.
* ``pause_before_save`` / ``pause_before_manifest``: rank 0 creates the file
  ``$DDPTRAIN_TEST_PAUSE_DIR/<point>@<STEP>`` and waits until a test deletes it.

Several faults may be given, separated by commas.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

log = logging.getLogger(__name__)

FAULT_ENV = "DDPTRAIN_TEST_FAULT"
PAUSE_ENV = "DDPTRAIN_TEST_PAUSE_DIR"
TEST_DELAY_S = 3.0


class TestFaultPlanner(DefaultSavePlanner):
    """DCP's default planner plus the delay_save / fail_save faults.

    ``finish_plan`` runs where the write runs (the background thread or process for an
    async save), just before this rank writes its shards. Module-level so that it can be
    pickled to DCP's writer process.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, fault: str, plan_caching: bool = False):
        super().__init__(enable_plan_caching=plan_caching)
        self.fault = fault

    def finish_plan(self, new_plan):
        if self.fault == "delay_save":
            time.sleep(TEST_DELAY_S)
        last_rank = int(os.environ.get("WORLD_SIZE", "1")) - 1
        if self.fault == "fail_save" and int(os.environ.get("RANK", "0")) == last_rank:
            raise RuntimeError("test fault fail_save: this rank's write failed")
        return super().finish_plan(new_plan)


def save_planner(step: int, plan_caching: bool = False) -> DefaultSavePlanner:
    """The planner for the save of ``step``: DCP's default unless a fault targets it."""
    for fault in ("delay_save", "fail_save"):
        if fault_configured(fault, step):
            return TestFaultPlanner(fault, plan_caching)
    return DefaultSavePlanner(enable_plan_caching=plan_caching)


def fault_configured(point: str, step: int) -> bool:
    return f"{point}@{step}" in os.environ.get(FAULT_ENV, "").split(",")


def maybe_inject_fault(point: str, step: int, pause_here: bool = True) -> None:
    """SIGKILL this process (``kill_*``) or wait for a test (``pause_*``, where
    ``pause_here``) when ``point@step`` is a configured fault."""
    if not fault_configured(point, step):
        return
    wanted = f"{point}@{step}"
    if point.startswith("kill_"):
        log.error("test fault %s: killing this process", wanted)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    if point.startswith("pause_") and pause_here:
        marker = os.path.join(os.environ[PAUSE_ENV], wanted)
        open(marker, "w").close()
        log.warning("test fault %s: waiting until %s is deleted", wanted, marker)
        deadline = time.monotonic() + 300
        while os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
