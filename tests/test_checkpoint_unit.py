"""The checkpoint contract on one process: commit, discovery, fallback, retention.

Runs against local disk, fsspec's ``memory://`` and a real S3 server (the session's
SeaweedFS, through s3fs), in a one-member gloo process group.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from ddptrain import dist
from ddptrain.checkpoint import (MANIFEST_NAME, CheckpointError, CheckpointManager,
                                 Manifest, RunIdentityMismatch, scan, step_dirname,
                                 verify)
from ddptrain.storage import Storage

IDENTITY = {"model.name": "cnn", "run.seed": 0}


@pytest.fixture(scope="module")
def info():
    if not torch.distributed.is_initialized():
        dist.init_distributed("cpu")
    yield dist.DistInfo(0, 1, 0, torch.device("cpu"))
    dist.teardown()


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "ckpts"))
    if request.param == "s3":  # the session's SeaweedFS server (skipped without it)
        server = request.getfixturevalue("s3_server")
        return Storage(server.unique_url("ckpt-tests"), server.storage_options())
    return Storage(f"memory://ckpt-tests/{uuid.uuid4().hex}")


def manager(storage, info, keep_last=100, identity=IDENTITY, events=None):
    def emit(name, **fields):
        if events is not None:
            events.append((name, fields))
    return CheckpointManager(storage, info, identity, keep_last, emit)


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 4), value)}, "progress": {"step": int(value)},
            "rng/rank0": {"torch": torch.get_rng_state()}}


def save(mgr, step, value=None):
    return mgr.save(state(step if value is None else value), step=step, epoch=0,
                    samples_seen=step * 8, global_batch_size=8, reason="interval")


def fake_checkpoint(storage: Storage, name: str, complete: bool = True) -> None:
    """A directory with a shard and .metadata; with a matching manifest if complete."""
    storage.makedirs(name)
    storage.fs.pipe_file(storage.path(name, "__0_0.distcp"), b"x" * 10)
    storage.fs.pipe_file(storage.path(name, ".metadata"), b"m" * 3)
    if complete:
        step = int(name.split("-")[1])
        manifest = Manifest(step=step, epoch=0, samples_seen=0, world_size=1,
                            global_batch_size=8, identity=IDENTITY, reason="interval",
                            files={"__0_0.distcp": 10, ".metadata": 3})
        storage.write_text_atomic(manifest.to_json(), name, MANIFEST_NAME)


def test_save_commits_a_manifest_naming_every_file(storage, info):
    assert save(manager(storage, info), 5)
    status = verify(storage, "step-00000005")
    assert status.complete
    assert status.manifest.files == {k: v for k, v in storage.file_sizes("step-00000005")
                                     .items() if k != MANIFEST_NAME}
    assert json.loads(storage.read_text("step-00000005", MANIFEST_NAME))["step"] == 5


def test_load_latest_returns_newest_complete_state(storage, info):
    mgr = manager(storage, info)
    save(mgr, 3)
    save(mgr, 7)
    manifest, loaded = mgr.load_latest(lambda m: state(0.0))
    assert manifest.step == 7
    assert torch.equal(loaded["model"]["w"], torch.full((3, 4), 7.0))


def test_steps_sort_as_numbers_and_retention_keeps_the_newest(storage, info):
    # Past 10**8 steps the names grow a digit: "step-100000000" < "step-99999900" as text.
    for step in (99_999_800, 99_999_900, 100_000_000):
        fake_checkpoint(storage, step_dirname(step))
    fake_checkpoint(storage, step_dirname(99_999_950), complete=False)  # older: debris
    fake_checkpoint(storage, step_dirname(100_000_100), complete=False)  # newer: in progress
    assert [s.step for s in scan(storage)] == [100_000_100, 100_000_000, 99_999_950,
                                               99_999_900, 99_999_800]

    manager(storage, info, keep_last=2).prune()
    assert sorted(storage.list_dirs()) == ["step-100000000", "step-100000100",
                                           "step-99999900"]


def test_only_names_ddptrain_writes_are_checkpoints(storage, info):
    """``step-5`` or ``step-000000005`` are someone else's: never listed, never pruned."""
    for name in ("step-5", "step-000000005", "step-abc"):
        fake_checkpoint(storage, name, complete=False)
    save(manager(storage, info, keep_last=1), 7)
    save(manager(storage, info, keep_last=1), 8)
    assert [s.name for s in scan(storage)] == ["step-00000008"]
    assert sorted(storage.list_dirs()) == ["step-000000005", "step-00000008", "step-5",
                                           "step-abc"]


def test_retention_never_deletes_the_newest_complete(storage, info):
    mgr = manager(storage, info, keep_last=1)
    for step in (1, 2, 3):
        save(mgr, step)
    assert storage.list_dirs() == ["step-00000003"]


def test_size_mismatch_or_missing_file_is_incomplete(storage, info):
    fake_checkpoint(storage, "step-00000001")
    storage.fs.pipe_file(storage.path("step-00000001", "__0_0.distcp"), b"x" * 9)
    status = verify(storage, "step-00000001")
    assert not status.complete and status.damaged and "bytes" in status.problem
    fake_checkpoint(storage, "step-00000002")
    storage.fs.rm(storage.path("step-00000002", ".metadata"))
    status = verify(storage, "step-00000002")
    assert not status.complete and status.damaged and "missing" in status.problem
    fake_checkpoint(storage, "step-00000003", complete=False)
    status = verify(storage, "step-00000003")
    assert not status.complete and not status.damaged  # never committed


def test_only_damaged_checkpoints_refuse_a_fresh_start(storage, info):
    """Committed checkpoints whose files were damaged later are not overwritten by a run
    that starts from scratch: the run stops and names them."""
    fake_checkpoint(storage, "step-00000004")
    storage.fs.pipe_file(storage.path("step-00000004", MANIFEST_NAME), b"{bad")
    fake_checkpoint(storage, "step-00000006", complete=False)  # a crashed save: no problem
    before = {n: storage.file_sizes(n) for n in storage.list_dirs()}
    with pytest.raises(CheckpointError, match="step-00000004") as raised:
        manager(storage, info).load_latest(lambda m: state(0.0))
    assert "unreadable manifest.json" in str(raised.value)
    assert "--ckpt.dir" in str(raised.value)
    assert {n: storage.file_sizes(n) for n in storage.list_dirs()} == before


def test_checkpoint_that_failed_to_load_is_rewritten_not_kept(storage, info):
    """A resume that fell back past an unloadable checkpoint recomputes its step; that
    save replaces the unloadable directory instead of keeping it as 'complete'."""
    mgr = manager(storage, info)
    save(mgr, 3)
    save(mgr, 5)
    metadata = storage.path("step-00000005", ".metadata")
    size = storage.file_sizes("step-00000005")[".metadata"]
    storage.fs.pipe_file(metadata, b"\0" * size)  # same size: the manifest still verifies
    events = []
    resumed = manager(storage, info, events=events)
    manifest, _ = resumed.load_latest(lambda m: state(0.0))
    assert manifest.step == 3
    assert [f["step"] for n, f in events if n == "checkpoint_load_failed"] == [5]
    assert save(resumed, 5)
    assert [n for n, _ in events if n == "replacing_unloadable"] == ["replacing_unloadable"]
    manifest, loaded = manager(storage, info).load_latest(lambda m: state(0.0))
    assert manifest.step == 5 and torch.equal(loaded["model"]["w"], torch.full((3, 4), 5.))


def test_incomplete_newer_is_skipped_with_a_warning_naming_it(storage, info):
    events = []
    mgr = manager(storage, info, events=events)
    save(mgr, 4)
    fake_checkpoint(storage, "step-00000009", complete=False)
    manifest, _ = mgr.load_latest(lambda m: state(0.0))
    assert manifest.step == 4
    skipped = [f for name, f in events if name == "skipped_incomplete"]
    assert [f["location"] for f in skipped] == [storage.describe("step-00000009")]


def test_other_run_identity_is_refused_naming_the_difference(storage, info):
    save(manager(storage, info), 2)
    other = manager(storage, info, identity={"model.name": "resnet18", "run.seed": 0})
    with pytest.raises(RunIdentityMismatch, match="model.name: checkpoint has 'cnn', this "
                                                  "run has 'resnet18'"):
        other.load_latest(lambda m: state(0.0))
    assert verify(storage, "step-00000002").complete  # nothing touched


def test_missing_rng_state_is_an_error_not_silently_skipped(storage, info):
    mgr = manager(storage, info)
    mgr.save({"model": {"w": torch.ones(2)}}, step=1, epoch=0, samples_seen=8,
             global_batch_size=8, reason="interval")
    with pytest.raises(CheckpointError, match="could be loaded"):
        mgr.load_latest(lambda m: {"model": {"w": torch.zeros(2)},
                                   "rng/rank0": {"torch": torch.get_rng_state()}})
    assert verify(storage, "step-00000001").complete


def test_existing_complete_step_is_never_overwritten(storage, info):
    mgr = manager(storage, info)
    save(mgr, 6, value=1.0)
    assert save(mgr, 6, value=2.0) is False
    _, loaded = mgr.load_latest(lambda m: state(0.0))
    assert torch.equal(loaded["model"]["w"], torch.full((3, 4), 1.0))


def test_unusable_location_fails_the_probe_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Exception, match=r"ckpt.dir=.*file/ckpts"):
        Storage(str(blocker / "ckpts")).probe()


def test_a_file_named_like_a_checkpoint_is_never_deleted(storage, info):
    storage.makedirs()
    storage.fs.pipe_file(storage.path("step-00000010"), b"precious")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        save(manager(storage, info), 10)
    assert storage.read_text("step-00000010") == "precious"
