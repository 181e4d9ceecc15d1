"""Object-store storage at unit level: option resolution, the probe's errors, directory
entries an S3 server keeps after deletes, commit verification, part size. The S3 cases
run against the session's SeaweedFS server (tests/s3server.py) in this process."""

from __future__ import annotations

import importlib.util
import uuid

import pytest
import torch

from ddptrain import checkpoint, dist
from ddptrain.checkpoint import CheckpointManager, SaveError, scan, verify
from ddptrain.storage import (S3_CONFIG_DEFAULTS, MiB, Storage, StorageError,
                              resolve_options)
from tests.s3server import HOST, _free_ports

pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def info():
    if not torch.distributed.is_initialized():
        dist.init_distributed("cpu")
    yield dist.DistInfo(0, 1, 0, torch.device("cpu"))
    dist.teardown()


def manager(storage, info, events=None):
    def emit(name, **fields):
        if events is not None:
            events.append((name, fields))
    return CheckpointManager(storage, info, {"run.seed": 0}, 100, emit)


def save(mgr, step, tensor):
    return mgr.save({"w": tensor}, step=step, epoch=0, samples_seen=step,
                    global_batch_size=1, reason="interval")


# -- options ------------------------------------------------------------------------------
def test_s3_aliases_move_into_client_kwargs_and_defaults_fill_in():
    resolved = resolve_options("s3", {"endpoint_url": "http://127.0.0.1:9", "region": "eu-x",
                                      "config_kwargs": {"retries": {"max_attempts": 2}}},
                               block_size=8 * MiB)
    assert resolved["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9",
                                         "region_name": "eu-x"}
    assert resolved["config_kwargs"] == {**S3_CONFIG_DEFAULTS,
                                         "retries": {"max_attempts": 2}}
    assert resolved["default_block_size"] == 8 * MiB
    assert "endpoint_url" not in resolved and "region" not in resolved


def test_conflicting_alias_is_an_error_and_other_protocols_are_untouched():
    with pytest.raises(StorageError, match="both region='a' and client_kwargs.region_name"):
        resolve_options("s3", {"region": "a", "client_kwargs": {"region_name": "b"}})
    assert resolve_options("memory", {"x": 1}, block_size=8 * MiB) == {"x": 1}


def test_block_size_and_retries_reach_s3fs(s3_server):
    storage = Storage(s3_server.unique_url("opts"), s3_server.storage_options(),
                      block_size=5 * MiB)
    fs = storage.dcp_writer("step-1").fs.fs
    assert fs.default_block_size == 5 * MiB and fs.fixed_upload_size
    assert fs.config_kwargs["retries"] == {"max_attempts": 5, "mode": "standard"}


def test_missing_protocol_package_names_it():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(StorageError, match=r"ckpt.dir='gs://bucket/run' needs gcsfs"):
        Storage("gs://bucket/run")


def test_secrets_from_options_and_environment_are_scrubbed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    storage = Storage("memory://scrub", {"client_kwargs": {"aws_secret_access_key": "opt-s"}})
    assert storage.scrub("a opt-s b env-secret-value c") == "a *** b *** c"


# -- probe --------------------------------------------------------------------------------
def probe_error(storage: Storage) -> str:
    with pytest.raises(StorageError) as caught:
        storage.probe()
    return str(caught.value)


def test_probe_wrong_secret(s3_server):
    secret = "wrong-" + uuid.uuid4().hex
    message = probe_error(Storage(s3_server.unique_url("p"),
                                  s3_server.storage_options(secret=secret)))
    assert f"endpoint {s3_server.endpoint_url}, bucket '{s3_server.bucket}'" in message
    assert "access denied" in message and secret not in message


def test_probe_unknown_bucket_is_not_created(s3_server):
    bucket = "missing-" + uuid.uuid4().hex[:10]
    message = probe_error(Storage(f"s3://{bucket}/run", s3_server.storage_options()))
    assert f"endpoint {s3_server.endpoint_url}, bucket '{bucket}'" in message
    assert f"the bucket '{bucket}' does not exist" in message
    assert s3_server.secret_key not in message
    assert not s3_server.fs().exists(bucket)


def test_probe_closed_port(s3_server):
    endpoint = f"http://{HOST}:{_free_ports(1)[0]}"
    message = probe_error(Storage(s3_server.url("p"), s3_server.storage_options(
        client_kwargs={"endpoint_url": endpoint})))
    assert f"endpoint {endpoint}, bucket '{s3_server.bucket}'" in message
    assert "cannot connect to the endpoint" in message
    assert s3_server.secret_key not in message


def test_probe_leaves_nothing_behind(s3_server):
    storage = Storage(s3_server.unique_url("p"), s3_server.storage_options())
    storage.probe()
    assert storage.file_sizes() == {} and storage.list_dirs() == []


# -- directory entries that outlive their objects -------------------------------------------
def test_emptied_directory_is_nothing_and_pruned(s3_server, info):
    storage = Storage(s3_server.unique_url("empty"), s3_server.storage_options())
    events = []
    mgr = manager(storage, info, events)
    save(mgr, 1, torch.ones(3))
    storage.fs.pipe_file(storage.path("step-00000009", "x"), b"x")
    storage.fs.rm(storage.path("step-00000009", "x"))
    assert "step-00000009" in storage.list_dirs()  # SeaweedFS keeps the entry
    assert verify(storage, "step-00000009").empty

    assert mgr.load_latest(lambda m: {"w": torch.zeros(3)})[0].step == 1
    assert not [e for e in events if e[0] == "skipped_incomplete"]
    save(mgr, 10, torch.ones(3))  # retention after this commit drops the older entry
    assert storage.list_dirs() == ["step-00000001", "step-00000010"]


# -- commit ---------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "s3"])
def storage(request) -> Storage:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return Storage(server.unique_url("commit"), server.storage_options())
    return Storage(f"memory://commit/{uuid.uuid4().hex}")


def test_leftovers_of_the_same_step_are_cleared_before_the_save(storage, info):
    storage.fs.pipe_file(storage.path("step-00000002", ".metadata.tmp"), b"leftover")
    storage.fs.pipe_file(storage.path("step-00000002", "__7_0.distcp"), b"stale")
    assert save(manager(storage, info), 2, torch.arange(10.0))
    manifest = verify(storage, "step-00000002").manifest
    # one file per writer thread (4 on object stores; the state has one tensor, so three
    # are empty), every one named in the manifest
    assert sorted(manifest.files) == [".metadata"] + [f"__0_{t}.distcp" for t in range(4)]
    assert manifest.files == {k: v for k, v in storage.file_sizes("step-00000002").items()
                              if k != "manifest.json"}


def test_upload_shorter_than_written_is_never_committed(storage, info, monkeypatch):
    real = checkpoint.written_sizes
    monkeypatch.setattr(checkpoint, "LISTING_ATTEMPTS", 1)
    monkeypatch.setattr(checkpoint, "written_sizes",
                        lambda md: {k: v + 1 for k, v in real(md).items()})
    with pytest.raises(SaveError, match=r"__0_0.distcp: \d+ listed, \d+ written"):
        save(manager(storage, info), 3, torch.ones(4))
    assert [s.complete for s in scan(storage)] == [False]


def test_large_shard_goes_up_in_parts_of_the_block_size(s3_server, info):
    storage = Storage(s3_server.unique_url("parts"), s3_server.storage_options(),
                      block_size=5 * MiB)
    save(manager(storage, info), 4, torch.randn(3 * MiB))  # 12 MiB: 5 + 5 + 2 MiB
    etag = storage.fs.info(storage.path("step-00000004", "__0_0.distcp"))["ETag"]
    assert etag.strip('"').endswith("-3")
