"""The one seam between local paths and fsspec URLs (s3://, gs://, memory://, file://, ...).

Locations are carried as strings, never ``pathlib.Path`` (which would collapse the ``//``
of a URL). Local directories get fsync'ed temp-file-and-rename writes; object stores get a
single PUT per small file, which is atomic there.
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ddptrain.config import SECRET_KEY_MARKERS

log = logging.getLogger(__name__)

#: fsspec implementations that ship in separate packages, by protocol.
PROTOCOL_PACKAGES = {"s3": "s3fs (pip install 'ddptrain[s3]')", "s3a": "s3fs", "gs": "gcsfs",
                     "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


class StorageError(RuntimeError):
    """The checkpoint location cannot be used; the message names it and the cause."""


class Storage:
    """Files and directories under one root location (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") if "://" in url and not url.endswith(":///") else url
        self.options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        except ImportError as exc:
            protocol = self.url.split("://", 1)[0]
            package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
            raise StorageError(f"ckpt.dir={self.url!r} needs {package}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise StorageError(f"ckpt.dir={self.url!r}: {self.scrub(str(exc))}") from exc
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)

    # -- naming -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path of ``parts`` below the root (for this Storage's fs)."""
        join = os.path.join if self.is_local else posixpath.join
        return join(self.root, *parts)

    def describe(self, *parts: str) -> str:
        """Human-readable location (the URL form) for messages."""
        return "/".join([self.url.rstrip("/"), *parts]) if parts else self.url

    def scrub(self, text: str) -> str:
        """Remove secret option values from a message."""
        for key, value in _flatten(self.options):
            if isinstance(value, str) and value and any(m in key.lower()
                                                        for m in SECRET_KEY_MARKERS):
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
        self.fs.rm(self.path(*parts), recursive=True)

    def probe(self) -> None:
        """Create the root, then write, read back and delete a tiny object.

        Raises StorageError naming the location when any of it fails.
        """
        name = f".ddptrain-probe-{uuid.uuid4().hex}"
        try:
            self.makedirs()
            self.fs.pipe_file(self.path(name), b"ddptrain")
            if self.fs.cat_file(self.path(name)) != b"ddptrain":
                raise StorageError("read back different bytes than written")
            self.fs.rm(self.path(name))
        except Exception as exc:
            hint = self._endpoint_hint()
            raise StorageError(f"checkpoint location ckpt.dir={self.url!r}{hint} is not "
                               f"usable (create, write, read and delete a test object): "
                               f"{type(exc).__name__}: {self.scrub(str(exc))}") from exc

    def _endpoint_hint(self) -> str:
        endpoint = (self.options.get("endpoint_url")
                    or self.options.get("client_kwargs", {}).get("endpoint_url"))
        return f" at endpoint {endpoint}" if endpoint else ""

    # -- DCP ------------------------------------------------------------------------------
    def dcp_writer(self, dirname: str, thread_count: int = 1):
        from torch.distributed.checkpoint import FileSystemWriter

        if self.is_local:
            return FileSystemWriter(self.path(dirname), sync_files=True,
                                    thread_count=thread_count, overwrite=True)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        # Object-store files have no fileno() to fsync; an upload is durable once its file
        # is closed (s3fs completes the multipart upload on close).
        return FsspecWriter(self.describe(dirname), sync_files=False,
                            thread_count=thread_count, overwrite=True, **self.options)

    def dcp_reader(self, dirname: str):
        from torch.distributed.checkpoint import FileSystemReader

        if self.is_local:
            return FileSystemReader(self.path(dirname))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(self.describe(dirname), **self.options)


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
