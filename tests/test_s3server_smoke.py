"""Smoke tests for the SeaweedFS S3 fixture and DCP-over-s3fs behaviour.

The assertions double as executable documentation of what torch 2.14's
FsspecWriter/FsspecReader and s3fs do against a real S3 server.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

s3fs = pytest.importorskip("s3fs")
botocore_exceptions = pytest.importorskip("botocore.exceptions")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint._fsspec_filesystem import (  # noqa: E402
    FsspecReader,
    FsspecWriter,
)
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from tests.s3server import HOST, SeaweedS3, SeaweedS3Error, _free_ports  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # DCP with no_dist=True always says this; not what these tests are about
    "ignore:torch.distributed is disabled:UserWarning"
)

# Fail fast instead of botocore's default 5 attempts with back-off (~6-13 s).
FAST_FAIL = {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 0}}


def _state_dict(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 8, generator=g),
        "b": torch.arange(10) + seed,
        "step": 7 + seed,
        "nested": {"lr": torch.tensor(0.1 + seed), "count": 3 + seed, "inner": {"x": torch.ones(3) * seed}},
    }


def _empty_like(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = _empty_like(v)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = None
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _save(sd, url, so, **writer_kw):
    return dcp.save(sd, storage_writer=FsspecWriter(url, **writer_kw, **so), no_dist=True)


def _load(url, so, like):
    out = _empty_like(like)
    dcp.load(out, storage_reader=FsspecReader(url, **so), no_dist=True)
    return out


# --------------------------------------------------------------------- (a)
def test_fixture_api_and_loopback_only(s3_server):
    s = s3_server
    assert s.running and s.endpoint_url == f"http://{HOST}:{s.ports['s3']}"
    assert len(set(s.ports.values())) == len(s.ports) == 8
    so = s.storage_options()
    assert so["key"] == s.access_key and so["secret"] == s.secret_key
    assert so["client_kwargs"]["endpoint_url"] == s.endpoint_url
    merged = s.storage_options(client_kwargs={"verify": False}, config_kwargs=FAST_FAIL)
    assert merged["client_kwargs"]["endpoint_url"] == s.endpoint_url and merged["config_kwargs"] == FAST_FAIL
    assert s.url("a", "b/") == f"s3://{s.bucket}/a/b"
    assert s.last_startup_s is not None and s.last_startup_s < 60
    print(f"startup {s.last_startup_s:.2f}s stages={s.startup_stages}")
    if os.path.isdir(f"/proc/{s.pid}/fd"):
        socks = s.listening_sockets()
        assert socks, "no listening sockets found"
        assert {ip for ip, _ in socks} == {HOST}, socks
        assert {port for _, port in socks} == set(s.ports.values()), (socks, s.ports)


def test_s3fs_write_read_list_delete(s3_server):
    fs = s3_server.fs()
    base = s3_server.path("smoke-rw")
    fs.pipe(f"{base}/a.bin", b"A" * 1000)
    with fs.open(f"{base}/dir/b.txt", "wb") as f:
        f.write(b"hello")
    assert fs.cat(f"{base}/a.bin") == b"A" * 1000
    with fs.open(f"{base}/dir/b.txt", "rb") as f:
        assert f.read() == b"hello"
    assert sorted(fs.find(base)) == [f"{base}/a.bin", f"{base}/dir/b.txt"]
    assert fs.info(f"{base}/a.bin")["size"] == 1000
    fs.rm(f"{base}/a.bin")
    fs.invalidate_cache()
    assert not fs.exists(f"{base}/a.bin")
    fs.rm(base, recursive=True)
    fs.invalidate_cache()
    assert fs.find(base, withdirs=False) in ([], [base])  # no objects left ...
    # ... but SeaweedFS (unlike AWS) keeps the emptied "directory" visible:
    assert fs.exists(base) and fs.info(base)["type"] == "directory"
    assert s3_server.rm_tree("smoke-rw") == 0  # removes the leftover dir entries
    fs.invalidate_cache()
    assert not fs.exists(base) and fs.find(base) == []


# --------------------------------------------------------------------- (b)
def test_dcp_roundtrip_sync_files_false(s3_server):
    url = s3_server.unique_url("dcp")
    so = s3_server.storage_options()
    sd = _state_dict(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fsync warnings with sync_files=False
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        _save(sd, url, so, sync_files=False)
    names = sorted(p.rsplit("/", 1)[-1] for p in s3_server.fs().ls(url))
    assert names == [".metadata", "__0_0.distcp"]
    _assert_same(_load(url, so, sd), sd)


def test_dcp_sync_files_true_only_warns(s3_server):
    """sync_files=True does NOT fail on s3fs: torch catches UnsupportedOperation('fileno')."""
    url = s3_server.unique_url("dcp-sync")
    so = s3_server.storage_options()
    sd = _state_dict(2)
    with pytest.warns(UserWarning, match=r"fsync not supported for this stream, relying on flush\(\): fileno") as rec:
        _save(sd, url, so, sync_files=True)
    fsync_warnings = [w for w in rec if "fsync not supported" in str(w.message)]
    assert len(fsync_warnings) == 2  # one per data file + one for .metadata
    _assert_same(_load(url, so, sd), sd)


def test_dcp_s3fs_tuning_kwargs_pass_through(s3_server):
    """FsspecWriter(**kw) -> fsspec.url_to_fs(path, **kw) -> s3fs.S3FileSystem(**kw)."""
    url = s3_server.unique_url("dcp-mpu")
    so = s3_server.storage_options(
        default_block_size=5 * 2**20, fixed_upload_size=True, max_concurrency=2, config_kwargs=FAST_FAIL
    )
    writer = FsspecWriter(url, sync_files=False, **so)
    fs = writer.fs.fs
    assert isinstance(fs, s3fs.S3FileSystem)
    assert (fs.default_block_size, fs.fixed_upload_size, fs.max_concurrency) == (5 * 2**20, True, 2)
    assert fs.config_kwargs == FAST_FAIL
    sd = {"t": torch.randn(3 * 2**20)}  # 12 MiB -> 5 + 5 + ~2 MiB parts
    dcp.save(sd, storage_writer=writer, no_dist=True)
    info = s3_server.fs().info(f"{url}/__0_0.distcp")
    assert info["ETag"].strip('"').endswith("-3"), info["ETag"]  # multipart, 3 parts
    out = {"t": torch.zeros_like(sd["t"])}
    dcp.load(out, storage_reader=FsspecReader(url, **so), no_dist=True)
    assert torch.equal(out["t"], sd["t"])


def test_s3fs_error_shapes(s3_server):
    s = s3_server
    # wrong secret -> PermissionError (SignatureDoesNotMatch)
    with pytest.raises(PermissionError, match="signature we calculated does not match") as ei:
        s.fs(secret="wrong-secret").ls(s.bucket)
    assert "SignatureDoesNotMatch" in str(ei.value.__cause__)
    # unknown access key -> PermissionError (InvalidAccessKeyId)
    with pytest.raises(PermissionError, match="access key ID you provided does not exist") as ei:
        s.fs(key="no-such-key").ls(s.bucket)
    assert "InvalidAccessKeyId" in str(ei.value.__cause__)
    # unknown bucket -> FileNotFoundError (NoSuchBucket) for reads and writes
    fs = s.fs()
    with pytest.raises(FileNotFoundError, match="The specified bucket does not exist"):
        fs.ls("no-such-bucket-x")
    with pytest.raises(FileNotFoundError, match="The specified bucket does not exist"):
        fs.pipe("no-such-bucket-x/k", b"1")
    assert fs.exists("no-such-bucket-x/k") is False
    # closed port -> botocore EndpointConnectionError (NOT an OSError), fast when bounded
    port = _free_ports(1)[0]
    closed = s3fs.S3FileSystem(
        skip_instance_cache=True,
        **s.storage_options(client_kwargs={"endpoint_url": f"http://{HOST}:{port}"}, config_kwargs=FAST_FAIL),
    )
    t0 = time.monotonic()
    with pytest.raises(botocore_exceptions.EndpointConnectionError, match="Could not connect to the endpoint URL"):
        closed.ls(s.bucket)
    assert time.monotonic() - t0 < 5


def test_dcp_error_shapes(s3_server):
    """DCP wraps storage errors in CheckpointException (a BaseException!) with .failures."""
    s = s3_server
    sd = _state_dict(3)
    with pytest.raises(CheckpointException) as ei:
        _save(sd, s.unique_url("bad"), s.storage_options(secret="wrong", config_kwargs=FAST_FAIL))
    assert not issubclass(CheckpointException, Exception)
    exc, _tb = ei.value.failures[0]
    assert isinstance(exc, PermissionError)
    # loading a checkpoint that does not exist: an AssertionError (not FileNotFoundError)
    with pytest.raises(CheckpointException) as ei:
        _load(s.unique_url("missing"), s.storage_options(), sd)
    exc = ei.value.failures[0][0]
    assert isinstance(exc, AssertionError) and "metadata is None" in str(exc)
    # closed port
    port = _free_ports(1)[0]
    so = s.storage_options(client_kwargs={"endpoint_url": f"http://{HOST}:{port}"}, config_kwargs=FAST_FAIL)
    with pytest.raises(CheckpointException) as ei:
        _save(sd, "s3://whatever/ck", so)
    assert isinstance(ei.value.failures[0][0], botocore_exceptions.EndpointConnectionError)


def test_dcp_save_creates_missing_bucket(s3_server):
    """Gotcha: FsspecWriter.prepare_local_plan -> fs.makedirs(path) -> s3fs CreateBucket.

    With credentials allowed to create buckets, saving to an unknown bucket does
    NOT fail - the bucket is silently created (server-side autoCreateBucket is off).
    """
    fs = s3_server.fs()
    bucket = f"autocreated-{time.time_ns() % 10**9}"
    assert bucket not in fs.ls("")
    url = f"s3://{bucket}/ck"
    so = s3_server.storage_options()
    _save(_state_dict(4), url, so, sync_files=False)
    fs.invalidate_cache()
    assert bucket in fs.ls("")
    fs.rm(bucket, recursive=True)


# --------------------------------------------------------------------- (c)
def test_restart_keeps_objects(s3_server):
    s = s3_server
    url = s.unique_url("persist")
    so = s.storage_options()
    sd = _state_dict(5)
    _save(sd, url, so, sync_files=False)
    s.fs().pipe(s.path("persist-raw/obj"), b"raw-bytes")
    pid, ports = s.pid, dict(s.ports)
    try:
        s.kill()  # SIGKILL: crash, no graceful flush
        assert not s.running
    finally:
        s.start()
    assert s.pid != pid and s.ports == ports
    assert s.fs().cat(s.path("persist-raw/obj")) == b"raw-bytes"
    # the fsspec-cached S3FileSystem (same storage options) keeps working after restart
    _assert_same(_load(url, so, sd), sd)


def test_crash_mid_save_then_restart_private_server(s3_server_factory, tmp_path):
    """Private server: kill it mid-save (data file written, .metadata not yet), restart,
    check the previous checkpoint still loads; then a SIGTERM-graceful stop() is bounded."""
    s = s3_server_factory(root_dir=tmp_path / "sw", bucket="crash-test")
    so = s.storage_options(config_kwargs=FAST_FAIL)
    good_url, bad_url = s.url("ckpt-1"), s.url("ckpt-2")
    good = _state_dict(6)
    _save(good, good_url, so, sync_files=False)

    class CrashingWriter(FsspecWriter):
        def finish(self, metadata, results):
            s.kill()  # SIGKILL the whole weed process group
            return super().finish(metadata, results)

    with pytest.raises(CheckpointException) as ei:
        dcp.save(_state_dict(7), storage_writer=CrashingWriter(bad_url, sync_files=False, **so), no_dist=True)
    assert isinstance(ei.value.failures[0][0], botocore_exceptions.EndpointConnectionError)
    assert not s.running

    s.start()  # same root, same ports
    fs = s.fs()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(bad_url))
    assert names == ["__0_0.distcp"]  # data written, no .metadata -> incomplete checkpoint
    with pytest.raises(CheckpointException):
        _load(bad_url, so, good)
    _assert_same(_load(good_url, so, good), good)

    t0 = time.monotonic()
    s.stop(graceful_timeout=0.5)  # SIGTERM, then SIGKILL (weed's own shutdown takes ~17 s)
    assert time.monotonic() - t0 < 5 and not s.running
    s.cleanup()
    assert (tmp_path / "sw" / "weed.log").exists()  # a caller-owned root is kept


def test_start_failure_reports_log_tail(tmp_path):
    s = SeaweedS3(root_dir=tmp_path / "bad", extra_args=("-no-such-flag",), start_timeout=20)
    t0 = time.monotonic()
    with pytest.raises(SeaweedS3Error, match=r"weed exited during startup(.|\n)*flag provided but not defined"):
        s.start()
    assert time.monotonic() - t0 < 10 and not s.running
    s.cleanup()
