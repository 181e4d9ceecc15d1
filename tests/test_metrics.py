"""RunLogger: the step line reaches the console once, also when a progress bar is shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ddptrain.metrics import METRICS_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rank 0 as the entry point sets it up: its console handler, then one logged step.
SCRIPT = """
import sys
from ddptrain.__main__ import setup_logging
from ddptrain.metrics import RunLogger
setup_logging(0)
run = RunLogger(sys.argv[1], is_main=True, total_steps=10, progress_bar=sys.argv[2])
assert (run.bar is not None) == (sys.argv[2] == "on")
run.advance()
run.train_step(step=1, epoch=0, loss=0.5, lr=0.1, images_per_s=100.0, data_wait=0.25)
run.close()
"""


@pytest.mark.parametrize("progress_bar", ["on", "off"])
def test_step_line_is_printed_once(tmp_path, progress_bar):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), progress_bar],
                          cwd=REPO, capture_output=True, text=True, check=True)
    line = "step 1/10 | epoch 0 | loss 0.5000 | lr 1.000e-01 | 100 img/s | data wait 25%"
    console = proc.stdout + proc.stderr
    assert console.count(line) == 1, console
    assert "Logging error" not in console
    with open(os.path.join(tmp_path, METRICS_FILE), encoding="utf-8") as f:
        rows = [json.loads(r) for r in f]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5)]
