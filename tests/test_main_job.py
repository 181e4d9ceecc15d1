"""The main job end to end: the default run's accuracy, ImageFolder data, torchvision models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ddptrain.config import DataConfig
from ddptrain.data import build_datasets
from tests.ckpt_compare import differences, load_flat
from tests.launch import (events, make_digit_imagefolder, read_jsonl, step_dirs, train)

pytestmark = pytest.mark.slow


def test_default_job_reaches_95_percent_top1(tmp_path):
    run_dir = str(tmp_path / "default")
    train(run_dir, fast=False)  # exactly the README job: no options but the run dir
    evals = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if r["kind"] == "eval"]
    assert len(evals) == 15
    assert all(r["samples"] == 359 for r in evals)  # every val sample once, no padding
    assert evals[-1]["top1"] >= 0.95
    with open(os.path.join(run_dir, "status.json")) as f:
        assert json.load(f)["state"] == "finished"
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert step_dirs(os.path.join(run_dir, "checkpoints")) == [
        "step-00000300", "step-00000308", "step-00000330"]


def test_imagefolder_png_training_resumes_exactly_with_workers(tmp_path):
    root = make_digit_imagefolder(str(tmp_path / "pngs"), per_class=30, with_splits=True)
    args = ("--data.root", root, "--data.image_size", "16", "--train.global_batch_size",
            "32", "--ckpt.every_steps", "5")
    full, crashed = str(tmp_path / "full"), str(tmp_path / "crashed")
    train(full, *args)
    with_workers = (*args, "--data.num_workers", "2")
    first = train(crashed, *with_workers, env={"DDPTRAIN_TEST_FAULT":
                                               "kill_before_manifest@15"}, check=False)
    assert first.returncode != 0
    train(crashed, *with_workers)

    assert [e["step"] for e in events(crashed, "resumed")] == [14]
    final = "step-00000021"  # 240 training images / 32 = 7 steps per epoch, 3 epochs
    a = load_flat(os.path.join(full, "checkpoints", final))
    b = load_flat(os.path.join(crashed, "checkpoints", final))
    assert differences(a, b) == []
    started = events(full, "run_started")[0]
    assert "ImageFolder" in started["data"] and "10 classes" in started["data"]


def test_single_tree_imagefolder_is_split_by_the_seeded_fraction(tmp_path):
    root = make_digit_imagefolder(str(tmp_path / "pngs"), per_class=10)
    cfg = DataConfig(root=root, val_fraction=0.2, image_size=12)
    data = build_datasets(cfg, seed=0, channels=None)
    assert (len(data.train), len(data.val), data.num_classes) == (80, 20, 10)
    again = build_datasets(cfg, seed=1, channels=None)
    assert again.val.labels == data.val.labels
    image, label, index = data.val[(-1, 0)]
    assert image.shape == (3, 12, 12)


def test_torchvision_model_by_name_trains(tmp_path):
    run_dir = str(tmp_path / "resnet")
    train(run_dir, "--model.name", "resnet18", "--train.max_steps", "2",
          "--train.global_batch_size", "16", "--ckpt.every_steps", "0",
          "--log.tensorboard", "true", nproc=0)
    assert any(n.startswith("events.out.tfevents")
               for n in os.listdir(os.path.join(run_dir, "tensorboard")))
    state = load_flat(os.path.join(run_dir, "checkpoints", "step-00000002"))
    assert "model.layer4.1.bn2.running_var" in state
    assert state["model.fc.weight"].shape == (10, 512)
    assert not any(k.startswith("model.module.") for k in state)


def test_help_lists_options_with_defaults():
    out = subprocess.run([sys.executable, "-m", "ddptrain", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--data.root", "--model.name", "--ckpt.dir", "--ckpt.every_steps",
                   "--ckpt.keep_last"):
        assert option in out
    assert "default: cnn" in out
