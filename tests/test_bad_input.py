"""Bad input: one clear error naming the problem and the fix; nothing saved is lost."""

from __future__ import annotations

import json
import os

import pytest

from tests.launch import events, make_digit_imagefolder, train, tree_fingerprint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> str:
    """A one-process run with one complete checkpoint (step 5)."""
    run_dir = str(tmp_path_factory.mktemp("saved") / "run")
    train(run_dir, "--train.max_steps", "5", "--ckpt.every_steps", "5", nproc=0)
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step-00000005",
                                       "manifest.json"))
    return run_dir


def fails_cleanly(run_dir: str, *args: str, nproc: int = 0) -> str:
    """Run, expect exit status 2 and no traceback; returns stderr."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    before = tree_fingerprint(checkpoints)
    proc = train(run_dir, *args, nproc=nproc, check=False)
    assert proc.returncode != 0
    if nproc == 0:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert tree_fingerprint(checkpoints) == before
    return proc.stderr


def test_missing_data_path(saved_run):
    err = fails_cleanly(saved_run, "--data.root", "/no/such/data")
    assert "data.root='/no/such/data' does not exist" in err


def test_class_folder_without_images(saved_run, tmp_path):
    root = make_digit_imagefolder(str(tmp_path / "images"), per_class=3)
    os.makedirs(os.path.join(root, "digit_empty"))
    err = fails_cleanly(saved_run, "--data.root", root)
    assert "class folder(s) with no images" in err and "digit_empty" in err


def test_corrupt_image_is_named(tmp_path):
    root = make_digit_imagefolder(str(tmp_path / "images"), per_class=5)
    bad = os.path.join(root, "digit3", "0002.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG this is not an image")
    err = fails_cleanly(str(tmp_path / "run"), "--data.root", root,
                        "--train.global_batch_size", "32")
    assert f"cannot read image file '{bad}'" in err


def test_verify_images_names_every_unreadable_file_before_step_1(tmp_path):
    root = make_digit_imagefolder(str(tmp_path / "images"), per_class=5)
    bad = [os.path.join(root, "digit3", "0002.png"), os.path.join(root, "digit7", "0004.png")]
    for path in bad:
        with open(path, "wb") as f:
            f.write(b"\x89PNG this is not an image")
    run_dir = str(tmp_path / "run")
    err = fails_cleanly(run_dir, "--data.root", root, "--train.global_batch_size", "8",
                        "--data.verify_images", "true", nproc=2)
    assert "data.verify_images: 2 unreadable sample(s)" in err
    assert all(f"image file {path!r}" in err for path in bad)
    assert events(run_dir, "first_step") == []
    with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as f:
        assert json.load(f)["state"] == "bad_input"


def test_unknown_model_lists_the_choices(saved_run):
    err = fails_cleanly(saved_run, "--model.name", "resnet9000")
    assert "model.name='resnet9000' is not a known model" in err
    assert "resnet18" in err and "cnn" in err


def test_unknown_config_key(saved_run):
    err = fails_cleanly(saved_run, "--ckpt.keep_lats", "2")
    assert "--ckpt.keep_lats" in err


def test_config_file_that_is_not_yaml_is_named(saved_run, tmp_path):
    path = str(tmp_path / "run.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("train:\n  epochs: [1\n")
    err = fails_cleanly(saved_run, "--config", path)
    assert f"--config {path}: not a readable YAML config file" in err and "line 2" in err


def test_checkpoint_location_not_usable(saved_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = fails_cleanly(saved_run, "--ckpt.dir", str(blocker / "ckpts"))
    assert f"ckpt.dir='{blocker}/ckpts'" in err and "not usable" in err


def test_checkpoint_of_another_architecture_is_refused(saved_run):
    from tests.launch import events

    config_path = os.path.join(saved_run, "config.yaml")
    with open(config_path, encoding="utf-8") as f:
        config_before = f.read()
    err = fails_cleanly(saved_run, "--model.name", "resnet18")
    assert "belongs to a different run" in err
    assert "model.name: checkpoint has 'cnn', this run has 'resnet18'" in err
    assert "--ckpt.dir" in err
    # The refused run leaves the saved run's resolved config alone and says why it stopped.
    with open(config_path, encoding="utf-8") as f:
        assert f.read() == config_before
    assert "name: cnn" in config_before
    refused = events(saved_run, "bad_input")
    assert refused and "belongs to a different run" in refused[-1]["message"]


def test_global_batch_not_divisible_by_world_size(saved_run):
    err = fails_cleanly(saved_run, "--train.global_batch_size", "63", nproc=2)
    assert "train.global_batch_size=63 is not divisible by world size (2)" in err


def test_global_batch_larger_than_the_data(saved_run):
    err = fails_cleanly(saved_run, "--train.global_batch_size", "4096")
    assert "train.global_batch_size=4096 is larger than the training split" in err


def test_cifar10_without_a_local_copy_is_not_downloaded(saved_run, tmp_path):
    err = fails_cleanly(saved_run, "--data.dataset", "cifar10", "--data.root",
                        str(tmp_path))
    assert "no usable CIFAR-10 copy" in err and "never attempted" in err
    assert not os.listdir(tmp_path)


def test_changed_schedule_on_resume_is_named_in_a_warning(saved_run):
    from tests.launch import events

    train(saved_run, "--train.max_steps", "5", "--ckpt.every_steps", "5",
          "--train.epochs", "20", nproc=0)
    [warning] = events(saved_run, "schedule_from_checkpoint")
    assert "total_steps: checkpoint 66, config 440" in warning["message"]


def test_run_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("precious")
    proc = train(str(path), "--ckpt.dir", str(tmp_path / "ckpts"), nproc=0, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"run.dir={str(path)!r} is not a writable directory" in proc.stderr
    assert "--run.dir" in proc.stderr and "Traceback" not in proc.stderr
    assert path.read_text() == "precious"
