"""Checkpoints in a real S3 bucket: 2-process torchrun runs against SeaweedFS on 127.0.0.1.

Credentials come the standard AWS way (environment variables), the endpoint through
``--ckpt.storage_options '{"endpoint_url": ...}'``. Same fast config as the local resume
contract tests: 3 epochs of 22 steps, a checkpoint every 10 steps and at epoch ends.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from tests.ckpt_compare import differences, load_flat
from tests.launch import (events, kill_group, read_jsonl, start, train, train_rows,
                          wait_until)
from tests.s3server import HOST, _free_ports

pytestmark = pytest.mark.slow
pytest.importorskip("s3fs")

STEPS = (10, 20, 22, 30, 40, 44, 50, 60, 66)
#: One file per rank and writer thread (4 threads on object stores by default).
FILES = {f"__{rank}_{thread}.distcp" for rank in (0, 1) for thread in range(4)} | {
    ".metadata", "manifest.json"}
FAST_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 2}}}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def s3_env(server, tmp_path, **extra) -> dict:
    """Credentials from the environment; no ~/.aws files and no instance metadata lookups
    (which would leave 127.0.0.1)."""
    return {"AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": server.region, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), **extra}


def s3_args(server, url: str, **options) -> list[str]:
    options = {"endpoint_url": server.endpoint_url, **options}
    return ["--ckpt.dir", url, "--ckpt.storage_options", json.dumps(options)]


def bucket_steps(server, url: str) -> dict[str, set[str]]:
    """Step directory -> names of the objects in it, as the bucket lists them."""
    fs = server.fs()
    base = url[len("s3://"):]
    found = {}
    for entry in fs.ls(base, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory" and name.startswith("step-"):
            found[name] = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(entry["name"])}
    return found


def load_from_bucket(server, url: str, step: int, tmp_path) -> dict:
    """Download one checkpoint directory and flatten it (tests/ckpt_compare)."""
    fs = server.fs()
    dest = tmp_path / f"download-{random.getrandbits(32):08x}"
    dest.mkdir()
    for path in fs.ls(f"{url[len('s3://'):]}/{step_name(step)}"):
        fs.get_file(path, str(dest / path.rsplit("/", 1)[-1]))
    return load_flat(str(dest))


def wait_for_pause(pause_dir, point: str, proc) -> str:
    marker = os.path.join(pause_dir, point)
    wait_until(lambda: os.path.exists(marker), proc, what=f"the pause at {point}")
    return marker


@pytest.fixture(scope="module")
def reference(s3_server, tmp_path_factory):
    """An uninterrupted run with every checkpoint in the session server's bucket:
    (server, url, scratch dir)."""
    tmp = tmp_path_factory.mktemp("s3-reference")
    url = s3_server.unique_url("reference")
    train(str(tmp / "run"), *s3_args(s3_server, url), env=s3_env(s3_server, tmp))
    return s3_server, url, tmp


def assert_equal_to_reference(reference, server, url: str, step: int, tmp_path) -> None:
    ref_server, ref_url, _ = reference
    ours = load_from_bucket(server, url, step, tmp_path)
    assert any("running_mean" in k for k in ours) and any(k.startswith("optim.") for k in ours)
    theirs = load_from_bucket(ref_server, ref_url, step, tmp_path)
    assert differences(ours, theirs) == []


def test_the_bucket_holds_the_same_layout_as_a_directory(reference, s3_server):
    _, url, tmp = reference
    steps = bucket_steps(s3_server, url)
    assert sorted(steps) == [step_name(s) for s in STEPS]
    assert all(files == FILES for files in steps.values())
    fs = s3_server.fs()
    final = f"{url[len('s3://'):]}/{step_name(66)}"
    manifest = json.loads(fs.cat_file(f"{final}/manifest.json"))
    listed = {p.rsplit("/", 1)[-1]: fs.info(p)["size"] for p in fs.ls(final)}
    assert manifest["files"] == {k: v for k, v in listed.items() if k != "manifest.json"}
    assert not os.path.exists(tmp / "run" / "checkpoints")


@pytest.fixture(scope="module")
def killed_and_resumed(reference, s3_server, tmp_path_factory):
    """SIGKILLed (torchrun and all workers) at a random step after a commit, then the same
    command again; keeps the last 2 checkpoints."""
    tmp = tmp_path_factory.mktemp("s3-killed")
    run_dir, url = str(tmp / "run"), s3_server.unique_url("killed")
    args = [*s3_args(s3_server, url), "--ckpt.keep_last", "2"]
    target = random.Random(20261204).randint(12, 60)
    proc = start(run_dir, *args, env=s3_env(s3_server, tmp))
    wait_until(lambda: events(run_dir, "checkpoint_committed")
               and max(train_rows(run_dir), default=0) >= target, proc, what=f"step {target}")
    kill_group(proc)
    proc.wait(timeout=30)
    killed_after = max(train_rows(run_dir))
    assert killed_after < 66
    train(run_dir, *args, env=s3_env(s3_server, tmp))
    return run_dir, url, killed_after


def test_sigkill_then_restart_resumes_from_the_bucket_bitwise_equal(
        reference, killed_and_resumed, s3_server, tmp_path):
    run_dir, url, killed_after = killed_and_resumed
    resumed = events(run_dir, "resumed")
    assert len(resumed) == 1 and 10 <= resumed[0]["step"] <= killed_after
    assert_equal_to_reference(reference, s3_server, url, 66, tmp_path)


def test_retention_on_the_bucket_keeps_exactly_the_last_n(killed_and_resumed, s3_server):
    _, url, _ = killed_and_resumed
    assert bucket_steps(s3_server, url) == {step_name(60): FILES, step_name(66): FILES}


def test_server_killed_during_a_save_resumes_from_the_previous_one(
        reference, s3_server_factory, tmp_path):
    server = s3_server_factory(root_dir=tmp_path / "seaweed")
    run_dir, url = str(tmp_path / "run"), server.unique_url("crash")
    args = [*s3_args(server, url, **FAST_RETRIES), "--ckpt.on_save_error", "stop",
            "--train.max_steps", "44"]
    pause_dir = str(tmp_path)
    proc = start(run_dir, *args, env=s3_env(server, tmp_path, DDPTRAIN_TEST_PAUSE_DIR=pause_dir,
                                            DDPTRAIN_TEST_FAULT="pause_before_manifest@40"))
    marker = wait_for_pause(pause_dir, "pause_before_manifest@40", proc)
    server.kill()  # shards and .metadata of step 40 are uploaded, the manifest is not
    os.remove(marker)
    assert proc.wait(timeout=300) != 0
    failed = events(run_dir, "checkpoint_failed")
    assert [(e["step"], e["message"].endswith("the run stops")) for e in failed] == [(40, True)]

    server.start()
    assert bucket_steps(server, url)[step_name(40)] == FILES - {"manifest.json"}
    train(run_dir, *args, env=s3_env(server, tmp_path))
    skipped = events(run_dir, "skipped_incomplete")
    assert [e["location"] for e in skipped] == [f"{url}/{step_name(40)}"]
    assert [e["step"] for e in events(run_dir, "resumed")] == [30]
    assert bucket_steps(server, url) == {step_name(s): FILES for s in STEPS[:6]}
    assert_equal_to_reference(reference, server, url, 40, tmp_path)
    assert_equal_to_reference(reference, server, url, 44, tmp_path)


def test_failed_periodic_save_is_logged_and_training_continues(
        reference, s3_server_factory, tmp_path):
    server = s3_server_factory(root_dir=tmp_path / "seaweed")
    run_dir, url = str(tmp_path / "run"), server.unique_url("continue")
    pause_dir = str(tmp_path)
    env = s3_env(server, tmp_path, DDPTRAIN_TEST_PAUSE_DIR=pause_dir,
                 DDPTRAIN_TEST_FAULT="pause_before_save@40,pause_before_save@44")
    proc = start(run_dir, *s3_args(server, url, **FAST_RETRIES), "--train.max_steps", "44",
                 env=env)
    marker = wait_for_pause(pause_dir, "pause_before_save@40", proc)
    server.kill()  # the whole save of step 40 finds no server
    os.remove(marker)
    marker = wait_for_pause(pause_dir, "pause_before_save@44", proc)
    server.start()
    os.remove(marker)
    assert proc.wait(timeout=300) == 0

    failed = events(run_dir, "checkpoint_failed")
    assert [e["step"] for e in failed] == [40]
    assert "training continues" in failed[0]["message"]
    assert [e["step"] for e in events(run_dir, "checkpoint_committed")] == [10, 20, 22, 30, 44]
    assert bucket_steps(server, url) == {step_name(s): FILES for s in (10, 20, 22, 30, 44)}
    # bitwise, RNG states included: botocore's retry jitter did not touch `random`
    assert_equal_to_reference(reference, server, url, 44, tmp_path)


def unusable(server, tmp_path, case: str) -> tuple[list[str], dict, str, str]:
    """(args, env, the secret in play, text the error must contain) for one bad location."""
    env = s3_env(server, tmp_path)
    where = f"(endpoint {server.endpoint_url}, bucket '{server.bucket}')"
    if case == "wrong_secret":
        secret = "wrong-" + os.urandom(8).hex()
        args = s3_args(server, server.unique_url("bad"), key=server.access_key, secret=secret)
        return args, env, secret, f"{where} is not usable: access denied"
    if case == "unknown_bucket":
        bucket = "missing-" + os.urandom(5).hex()
        args = s3_args(server, f"s3://{bucket}/run")
        where = f"(endpoint {server.endpoint_url}, bucket '{bucket}')"
        return args, env, server.secret_key, (f"{where} is not usable: the bucket "
                                              f"'{bucket}' does not exist")
    endpoint = f"http://{HOST}:{_free_ports(1)[0]}"
    args = s3_args(server, server.unique_url("bad"), endpoint_url=endpoint)
    return args, env, server.secret_key, (f"(endpoint {endpoint}, bucket '{server.bucket}') "
                                          "is not usable: cannot connect to the endpoint")


@pytest.mark.parametrize("case, nproc", [("wrong_secret", 2), ("unknown_bucket", 0),
                                         ("closed_port", 0)])
def test_unusable_location_fails_before_step_1_naming_it(s3_server, tmp_path, case, nproc):
    """Torchrun with 2 ranks once (both probe, one error); plain python for the others."""
    args, env, secret, expected = unusable(s3_server, tmp_path, case)
    run_dir = str(tmp_path / "run")
    proc = train(run_dir, *args, env=env, check=False, nproc=nproc)
    assert proc.returncode == (2 if nproc == 0 else 1)
    assert expected in proc.stderr and proc.stderr.count("is not usable") == 1
    if nproc:  # torchrun's own report (one traceback) names the ranks' exit status 2
        assert re.search(r"exitcode\s*: 2 ", proc.stderr)
        assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr
    else:
        assert "Traceback" not in proc.stderr
    assert secret not in proc.stderr
    for folder, _, names in os.walk(run_dir):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), name
    assert not [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                if r["kind"] == "train"]
    if case == "unknown_bucket":
        assert not s3_server.fs().exists(args[1][len("s3://"):].split("/")[0])
