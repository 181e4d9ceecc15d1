"""The one seam between local paths and fsspec URLs (s3://, gs://, memory://, file://, ...).

Locations are carried as strings, never ``pathlib.Path`` (which would collapse the ``//``
of a URL). Local directories get fsync'ed temp-file-and-rename writes; object stores get a
single PUT per small file, which is atomic there.

For s3:// (s3fs) the user's ``storage_options`` are completed by :func:`resolve_options`:
friendly aliases (``endpoint_url``, ``region``) move into ``client_kwargs``, botocore gets
bounded timeouts and retries with backoff for transient errors, and the multipart part
size comes from ``ckpt.block_size_mb``. Anything the user sets wins over these defaults.
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
import uuid
from typing import Any, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ddptrain.config import SECRET_KEY_MARKERS

log = logging.getLogger(__name__)

#: fsspec implementations that ship in separate packages, by protocol.
PROTOCOL_PACKAGES = {"s3": "s3fs (pip install 'ddptrain[s3]')", "s3a": "s3fs", "gs": "gcsfs",
                     "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
#: Protocols served by s3fs; resolve_options() applies to them.
S3_PROTOCOLS = ("s3", "s3a")
#: Object stores whose first path component is a bucket (container) that must exist.
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss")
#: Top-level aliases in ckpt.storage_options for s3, mapped into s3fs's client_kwargs.
S3_ALIASES = {"endpoint_url": "endpoint_url", "region": "region_name",
              "region_name": "region_name"}
#: botocore settings for saves and loads unless storage_options.config_kwargs sets them:
#: "standard" retries back off exponentially (with jitter, at most 20 s a wait) on 5xx,
#: throttling, timeouts and connection errors; 5 attempts wait about 15 s at most.
#: s3fs retries throttling ("SlowDown") and broken responses 5 times on top of that.
S3_CONFIG_DEFAULTS = {"connect_timeout": 10, "read_timeout": 60,
                      "retries": {"max_attempts": 5, "mode": "standard"}}
#: The probe must answer within seconds when the endpoint is unreachable.
S3_PROBE_CONFIG = {"connect_timeout": 3, "read_timeout": 20,
                   "retries": {"max_attempts": 2, "mode": "standard"}}
#: Environment variables whose values are scrubbed from messages like secret options.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
MiB = 2**20
#: Default DCP writer threads (= parallel uploads per rank) on object stores; one file
#: per thread, since s3fs uploads the parts of one file one after another.
OBJECT_STORE_THREADS = 4


class StorageError(RuntimeError):
    """The checkpoint location cannot be used; the message names it and the cause."""


class Storage:
    """Files and directories under one root location (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 block_size: Optional[int] = None):
        self.url = url.rstrip("/") if "://" in url and not url.endswith(":///") else url
        self.protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        self.options = resolve_options(self.protocol, storage_options or {}, block_size)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        except ImportError as exc:
            package = PROTOCOL_PACKAGES.get(self.protocol,
                                            f"the fsspec package for {self.protocol}://")
            raise StorageError(f"ckpt.dir={self.url!r} needs {package}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise StorageError(f"ckpt.dir={self.url!r}: {self.scrub(str(exc))}") from exc
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)

    @property
    def bucket(self) -> Optional[str]:
        """The bucket (container) of an object-store URL, else None."""
        if self.protocol not in BUCKET_PROTOCOLS:
            return None
        return self.root.strip("/").split("/", 1)[0] or None

    # -- naming -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path of ``parts`` below the root (for this Storage's fs)."""
        join = os.path.join if self.is_local else posixpath.join
        return join(self.root, *parts)

    def describe(self, *parts: str) -> str:
        """Human-readable location (the URL form) for messages."""
        return "/".join([self.url.rstrip("/"), *parts]) if parts else self.url

    def scrub(self, text: str) -> str:
        """Remove secret values (options and AWS environment variables) from a message."""
        secrets = [value for key, value in _flatten(self.options)
                   if isinstance(value, str) and any(m in key.lower()
                                                     for m in SECRET_KEY_MARKERS)]
        secrets += [os.environ.get(name) for name in SECRET_ENV_VARS]
        for value in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(value, "***")
        return text

    # -- listing and reading --------------------------------------------------------------
    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the directories directly below ``parts`` (empty if it does not exist)."""
        return [name for name, kind, _ in self._entries(self.path(*parts))
                if kind == "directory"]

    def file_sizes(self, *parts: str) -> dict[str, int]:
        """Name -> size in bytes of the files directly in ``parts``."""
        return {name: size for name, kind, size in self._entries(self.path(*parts))
                if kind == "file"}

    def _entries(self, path: str) -> list[tuple[str, str, int]]:
        self.fs.invalidate_cache(path)
        try:
            listing = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        entries = []
        for item in listing:
            name = posixpath.basename(item["name"].rstrip("/"))
            if name and item["name"].rstrip("/") != path.rstrip("/"):
                entries.append((name, item.get("type", "file"), int(item.get("size") or 0)))
        return entries

    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache(self.path(*parts))
        return self.fs.exists(self.path(*parts))

    def is_file(self, *parts: str) -> bool:
        return self.fs.isfile(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.fs.cat_file(self.path(*parts)).decode("utf-8")

    # -- writing --------------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def write_text_atomic(self, text: str, *parts: str) -> None:
        """Make ``parts`` appear with ``text`` all at once or not at all."""
        data = text.encode("utf-8")
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data)  # one PUT: atomic on object stores
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(os.path.dirname(target))

    def delete_tree(self, *parts: str) -> None:
        """Delete a directory with everything in it.

        Some S3 servers (SeaweedFS) keep listing an emptied "directory" until its own key
        ``prefix/`` is deleted; that entry is removed too. TODO: the unfinished multipart
        uploads of a killed save are invisible here; they are left to the bucket's
        AbortIncompleteMultipartUpload lifecycle rule (README) rather than aborted.
        """
        path = self.path(*parts)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass  # nothing but such an empty directory entry, or already gone
        if not self.is_local and self.exists(*parts):
            self.fs.rm_file(path.rstrip("/") + "/")
            self.fs.invalidate_cache(path)

    # -- probe ----------------------------------------------------------------------------
    def probe(self) -> None:
        """Write, read back and delete a tiny object, with short timeouts and few retries.

        Raises one StorageError naming the location, endpoint and bucket, and the likely
        cause (unreachable endpoint, missing bucket, rejected credentials), without any
        secret. Buckets are never created: a missing one is an error.
        """
        fs = self._probe_fs()
        path = self.path(f".ddptrain-probe-{uuid.uuid4().hex}")
        try:
            if self.bucket is None:
                fs.makedirs(self.path(), exist_ok=True)
            fs.pipe_file(path, b"ddptrain")
            if fs.cat_file(path) != b"ddptrain":
                raise StorageError("read back different bytes than written")
            fs.rm_file(path)
        except Exception as exc:
            raise StorageError(self._probe_message(exc, fs)) from exc

    def _probe_fs(self):
        if self.protocol not in S3_PROTOCOLS:
            return self.fs
        options = copy.deepcopy(self.options)
        options["config_kwargs"] = {**options.get("config_kwargs", {}), **S3_PROBE_CONFIG}
        return fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)

    def _probe_message(self, exc: Exception, fs) -> str:
        where = [f"endpoint {e}" for e in [self.endpoint(fs)] if e]
        where += [f"bucket {self.bucket!r}"] if self.bucket else []
        text = str(exc).lower()
        if isinstance(exc, FileNotFoundError) and self.bucket and "bucket" in text:
            cause = (f"the bucket {self.bucket!r} does not exist (ddptrain never creates "
                     "buckets: create it, or fix the URL)")
        elif isinstance(exc, PermissionError):
            cause = ("access denied: the credentials were rejected or may not write, read "
                     "and delete objects there (check key/secret or profile in "
                     "ckpt.storage_options, the AWS_* environment variables, the bucket "
                     "policy)")
        elif _is_connection_error(exc):
            cause = "cannot connect to the endpoint (is it up, is endpoint_url right?)"
        else:
            cause = "writing, reading back and deleting a test object failed"
        return (f"checkpoint location ckpt.dir={self.url!r}"
                f"{' (' + ', '.join(where) + ')' if where else ''} is not usable: {cause}. "
                f"{type(exc).__name__}: {self.scrub(str(exc))}")

    def endpoint(self, fs=None) -> Optional[str]:
        """The S3 endpoint URL in use (configured, from the environment, or AWS's)."""
        if self.protocol not in S3_PROTOCOLS:
            return None
        client = getattr(fs or self.fs, "_s3", None)
        endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None)
        return (endpoint or self.options.get("client_kwargs", {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the default AWS endpoint")

    # -- DCP ------------------------------------------------------------------------------
    def dcp_writer(self, dirname: str, thread_count: Optional[int] = None):
        """DCP writer into ``dirname``; ``thread_count`` None: 1 locally, else
        OBJECT_STORE_THREADS."""
        from torch.distributed.checkpoint import FileSystemWriter

        if thread_count is None:
            thread_count = 1 if self.is_local else OBJECT_STORE_THREADS
        if self.is_local:
            return FileSystemWriter(self.path(dirname), sync_files=True,
                                    thread_count=thread_count, overwrite=True)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        # Object-store files have no fileno() to fsync; an upload is durable once its file
        # is closed (s3fs completes the multipart upload on close), and the commit checks
        # the listed sizes. TODO: torch.save hands s3fs each tensor in one write, so a
        # writer thread buffers a full copy of its largest tensor before the parts go up;
        # bounded memory needs a writer that serializes tensors in slices.
        return FsspecWriter(self.describe(dirname), sync_files=False,
                            thread_count=thread_count, overwrite=True, **self.options)

    def dcp_reader(self, dirname: str):
        from torch.distributed.checkpoint import FileSystemReader

        if self.is_local:
            return FileSystemReader(self.path(dirname))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(self.describe(dirname), **self.options)


def resolve_options(protocol: str, options: dict[str, Any],
                    block_size: Optional[int] = None) -> dict[str, Any]:
    """The fsspec options for ``protocol``: the user's, plus ddptrain's s3 defaults.

    For s3fs: ``endpoint_url`` and ``region`` (or ``region_name``) may be given at the top
    level and move into ``client_kwargs``; ``config_kwargs`` (botocore) get
    S3_CONFIG_DEFAULTS for keys not set; ``default_block_size`` (the multipart part size)
    becomes ``block_size`` unless set, and ``fixed_upload_size`` defaults to True so that
    every part has exactly that size (s3fs would otherwise send whatever one write() call
    buffered as one part: a whole tensor, up to 5 GiB, in a single request). Other
    protocols get the options unchanged.
    """
    resolved = copy.deepcopy(dict(options))
    if protocol not in S3_PROTOCOLS:
        return resolved
    client = dict(resolved.pop("client_kwargs", None) or {})
    for alias, key in S3_ALIASES.items():
        if alias not in resolved:
            continue
        value = resolved.pop(alias)
        if client.get(key, value) != value:
            raise StorageError(f"ckpt.storage_options sets both {alias}={value!r} and "
                               f"client_kwargs.{key}={client[key]!r}; keep one")
        client[key] = value
    if client:
        resolved["client_kwargs"] = client
    resolved["config_kwargs"] = {**copy.deepcopy(S3_CONFIG_DEFAULTS),
                                 **(resolved.get("config_kwargs") or {})}
    given = resolved.get("default_block_size")
    if block_size and given and given != block_size:
        log.warning("ckpt.storage_options.default_block_size=%s overrides "
                    "ckpt.block_size_mb (%d MiB)", given, block_size // MiB)
    # TODO: ckpt.block_size_mb reaches s3fs only; gcsfs (block_size) and adlfs (blocksize)
    # take their own option in storage_options until they are tested against a server.
    if block_size:
        resolved.setdefault("default_block_size", block_size)
    resolved.setdefault("fixed_upload_size", True)
    return resolved


def _is_connection_error(exc: BaseException) -> bool:
    """Connection refused/reset or timed out, including botocore's own classes."""
    names = {c.__name__ for c in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(
        names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                 "ReadTimeoutError", "ConnectionError"})


def _flatten(options: dict[str, Any], prefix: str = ""):
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
