"""python -m ddptrain.ckpt: list, verify and export checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddptrain.model import build_model
from tests.launch import train

pytestmark = pytest.mark.slow


def tool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddptrain.ckpt", *args],
                          capture_output=True, text=True, check=check)


def test_list_verify_export(tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, "--train.max_steps", "4", "--ckpt.every_steps", "2", nproc=0)
    ckpts = os.path.join(run_dir, "checkpoints")
    os.makedirs(os.path.join(ckpts, "step-00000009"))
    with open(os.path.join(ckpts, "step-00000009", "__0_0.distcp"), "wb") as f:
        f.write(b"partial shard")

    lines = tool("list", ckpts).stdout.splitlines()
    assert lines[0].startswith("step-00000009  INCOMPLETE  no manifest.json")
    assert lines[1].startswith("step-00000004  complete  step=4")
    assert lines[2].startswith("step-00000002  complete  step=2")

    assert '"step": 4' in tool("verify", ckpts).stdout
    assert tool("verify", ckpts, "--name", "step-00000009", check=False).returncode == 1
    assert '"step": 2' in tool("verify", os.path.join(ckpts, "step-00000002")).stdout
    missing = tool("list", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 1 and "no such checkpoint location" in missing.stderr

    out = str(tmp_path / "weights.pt")
    tool("export", ckpts, out)
    weights = torch.load(out, weights_only=True)
    build_model("cnn", 10, 1).load_state_dict(weights)  # strict: every key matches


    # A same-size corruption of .metadata passes verify's size check; export names it.
    metadata = os.path.join(ckpts, "step-00000002", ".metadata")
    size = os.path.getsize(metadata)
    with open(metadata, "wb") as f:
        f.write((b"\x80\x04" + bytes(range(256)) * (size // 256 + 1))[:size])
    assert os.path.getsize(metadata) == size
    damaged = tool("export", ckpts, str(tmp_path / "w2.pt"), "--name", "step-00000002",
                   check=False)
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr
    assert "step-00000002: could not be read, it may be damaged" in damaged.stderr
    assert not os.path.exists(tmp_path / "w2.pt")
    nowhere = tool("export", ckpts, str(tmp_path / "no" / "w.pt"), check=False)
    assert nowhere.returncode == 1 and "OUT must be a file path in an existing" in \
        nowhere.stderr and "Traceback" not in nowhere.stderr
