"""The checkpoint contract: save, commit, discovery, load with fallback, retention.

Layout under ``ckpt.dir`` (local path or fsspec URL)::

    step-00000120/  __0_0.distcp  __1_0.distcp  .metadata  manifest.json

1. A new directory per save, named by the zero-padded global step.
2. Every rank calls DCP save into it; DCP writes ``.metadata`` after all shards.
3. Rank 0 then checks that every file DCP reports as written is listed with (at least)
   the bytes written, and writes ``manifest.json`` last (JSON, atomically: rename on
   disk, one PUT on object stores): the commit marker. It names every file with its size.
4. Complete = the manifest parses and every file it names exists with that size. Anything
   else (also an empty directory entry an object store keeps listing) is never loaded.
5. Discovery runs on rank 0 and the choice is broadcast, so all ranks load the same step.
6. If loading fails on any rank, all ranks agree, log it and try the next older one;
   nothing is deleted because it failed to load.
7. Retention (rank 0, after a commit) keeps the newest ``keep_last`` complete checkpoints
   and deletes incomplete directories only when older than the newest complete one.
8. A checkpoint of another run (model, data, seed, batch) is refused, naming the difference.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ddptrain import __version__, dist
from ddptrain.rng import keeps_python_random
from ddptrain.storage import Storage, StorageError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
STEP_DIR_PATTERN = re.compile(r"^step-(\d+)$")
#: Test-only fault injection, a comma-separated list: "kill_before_manifest@STEP" SIGKILLs
#: every rank after the shards and .metadata of that step's save are written but before
#: the manifest; "pause_before_save@STEP" / "pause_before_manifest@STEP" make rank 0 create
#: the file PAUSE_ENV/<point>@<STEP> there and wait until it is deleted.
FAULT_ENV = "DDPTRAIN_TEST_FAULT"
PAUSE_ENV = "DDPTRAIN_TEST_PAUSE_DIR"
#: Listing attempts before a commit gives up on a file DCP wrote (eventual consistency).
LISTING_ATTEMPTS = 4


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message says what and where."""


class RunIdentityMismatch(CheckpointError):
    """The checkpoint directory belongs to a different run."""


class SaveError(CheckpointError):
    """A save or its commit failed on some rank; nothing was committed."""


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> Optional[int]:
    match = STEP_DIR_PATTERN.match(name)
    return int(match.group(1)) if match else None


@dataclass
class Manifest:
    step: int
    epoch: int
    samples_seen: int
    world_size: int
    global_batch_size: int
    identity: dict[str, Any]
    reason: str
    files: dict[str, int]
    format_version: int = FORMAT_VERSION
    torch_version: str = torch.__version__
    ddptrain_version: str = __version__
    created_unix: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format {data.get('format_version')!r}")
        return cls(**data)


@dataclass
class CheckpointStatus:
    """What discovery found in one ``step-*`` directory."""

    name: str
    step: int
    manifest: Optional[Manifest]
    problem: str = ""
    empty: bool = False  # no files at all: nothing, not even a failed save

    @property
    def complete(self) -> bool:
        return self.manifest is not None


def verify(storage: Storage, name: str) -> CheckpointStatus:
    """Check one directory against its manifest (existence and size of every file)."""
    step = parse_step(name)
    files = storage.file_sizes(name)
    if not files:
        return CheckpointStatus(name, step, None, "empty directory", empty=True)
    if MANIFEST_NAME not in files:
        return CheckpointStatus(name, step, None, "no manifest.json (save never committed)")
    try:
        manifest = Manifest.from_json(storage.read_text(name, MANIFEST_NAME))
    except (ValueError, TypeError, KeyError) as exc:
        return CheckpointStatus(name, step, None, f"unreadable manifest.json: {exc}")
    if manifest.step != step:
        return CheckpointStatus(name, step, None, f"manifest says step {manifest.step}")
    if ".metadata" not in manifest.files:
        return CheckpointStatus(name, step, None, "manifest lists no .metadata")
    for fname, size in sorted(manifest.files.items()):
        if fname not in files:
            return CheckpointStatus(name, step, None, f"missing file {fname}")
        if files[fname] != size:
            return CheckpointStatus(name, step, None,
                                    f"{fname} has {files[fname]} bytes, manifest says {size}")
    return CheckpointStatus(name, step, manifest)


def scan(storage: Storage) -> list[CheckpointStatus]:
    """Every ``step-*`` directory, newest step first (steps compare as numbers)."""
    names = [n for n in storage.list_dirs() if parse_step(n) is not None]
    names.sort(key=parse_step, reverse=True)
    return [verify(storage, n) for n in names]


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


class CheckpointManager:
    """Saves and finds checkpoints for one run; every method is called on all ranks."""

    def __init__(self, storage: Storage, info: dist.DistInfo, identity: dict[str, Any],
                 keep_last: int, emit: Callable[..., None],
                 thread_count: Optional[int] = None):
        self.storage = storage
        self.info = info
        self.identity = identity
        self.keep_last = keep_last
        self.emit = emit
        self.thread_count = thread_count

    # -- location check --------------------------------------------------------------------
    @keeps_python_random
    def probe(self) -> None:
        """Every rank (each writes its own shards) checks the location; if any fails, every
        rank raises the same StorageError (rank 0's message when it failed too)."""
        try:
            self.storage.probe()
            problem = None
        except StorageError as exc:
            problem = str(exc)
        problems = dist.all_gather_object(problem)
        failed = [rank for rank, p in enumerate(problems) if p]
        if failed:
            where = "" if len(failed) == len(problems) else f" (on rank(s) {failed})"
            raise StorageError(f"{problems[failed[0]]}{where}")

    # -- save + commit ---------------------------------------------------------------------
    @keeps_python_random
    def save(self, state: dict[str, Any], *, step: int, epoch: int, samples_seen: int,
             global_batch_size: int, reason: str) -> bool:
        """Write and commit a checkpoint of ``state``; True once it is complete.

        Raises SaveError when the save failed on any rank (nothing is committed).
        Returns False without writing when a complete checkpoint of this step exists.
        """
        name = step_dirname(step)
        started = time.monotonic()
        _maybe_inject_fault("pause_before_save", step, self.info.is_main)
        ready = self._guarded(lambda: self._prepare_dir(name)) if self.info.is_main else None
        ready = dist.broadcast_object(ready)
        if isinstance(ready, str):
            raise SaveError(f"preparing {self.storage.describe(name)} failed: {ready}")
        if not ready:
            return False

        error, metadata = None, None
        try:
            metadata = dcp.save(state, storage_writer=self.storage.dcp_writer(
                name, self.thread_count))
        except (Exception, CheckpointException) as exc:  # agreed on below; reported
            error = exc
        if dist.any_rank(error is not None):
            raise SaveError(f"saving {self.storage.describe(name)} failed: "
                            f"{self.storage.scrub(str(error or 'on another rank'))}")
        _maybe_inject_fault("kill_before_manifest", step)
        _maybe_inject_fault("pause_before_manifest", step, self.info.is_main)

        manifest = Manifest(step=step, epoch=epoch, samples_seen=samples_seen,
                            world_size=self.info.world_size,
                            global_batch_size=global_batch_size, identity=self.identity,
                            reason=reason, files={})
        error = self._commit(name, manifest, metadata) if self.info.is_main else None
        if dist.any_rank(error is not None):
            raise SaveError(f"committing {self.storage.describe(name)} failed: "
                            f"{error or 'on rank 0'}")
        seconds = time.monotonic() - started
        size = sum(manifest.files.values()) if self.info.is_main else None
        self.emit("checkpoint_committed", step=step, reason=reason, seconds=round(seconds, 3),
                  bytes=size, location=self.storage.describe(name))
        if self.info.is_main:
            self._guarded(self.prune, "retention skipped")
        return True

    def _guarded(self, action: Callable[[], Any], warning: str = "") -> Any:
        """``action()``, or its scrubbed error as a string (logged when ``warning``)."""
        try:
            return action()
        except Exception as exc:
            message = self.storage.scrub(f"{type(exc).__name__}: {exc}")
            if warning:
                log.warning("%s: %s", warning, message)
            return message

    def _prepare_dir(self, name: str) -> bool:
        """Rank 0: False if a complete checkpoint of this step exists; removes leftovers."""
        if not self.storage.exists(name):
            return True
        status = verify(self.storage, name)
        if status.complete:
            self.emit("checkpoint_exists", step=status.step, level=logging.WARNING,
                      message=f"{self.storage.describe(name)} is already complete; "
                              "not overwriting it")
            return False
        # A directory of this step without a commit is the leftover of a crashed attempt.
        if not status.empty:
            self.emit("removed_incomplete", level=logging.WARNING, step=status.step,
                      location=self.storage.describe(name), problem=status.problem)
        self.storage.delete_tree(name)
        return True

    def _commit(self, name: str, manifest: Manifest, metadata: Any) -> Optional[str]:
        """Rank 0: list what DCP wrote, then PUT the manifest; an error message or None."""
        try:
            manifest.files, missing = self._listed_as_written(name, written_sizes(metadata))
            if missing:
                return (f"not every file DCP wrote is in {self.storage.describe(name)}: "
                        f"{'; '.join(missing)}")
            self.storage.write_text_atomic(manifest.to_json(), name, MANIFEST_NAME)
        except Exception as exc:
            return self.storage.scrub(f"{type(exc).__name__}: {exc}")
        return None

    def _listed_as_written(self, name: str, written: dict[str, int]
                           ) -> tuple[dict[str, int], list[str]]:
        """The listed files of a save (``*.tmp`` leftovers of DCP's .metadata rename
        excluded) and which files DCP wrote are missing from the listing or shorter."""
        wanted = {**written, ".metadata": 1}
        for attempt in range(LISTING_ATTEMPTS):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))  # an eventually consistent listing
            files = {f: size for f, size in self.storage.file_sizes(name).items()
                     if f != MANIFEST_NAME and not f.endswith(".tmp")}
            missing = [f"{f}: {files.get(f, 'not')} listed, {size} written"
                       for f, size in sorted(wanted.items()) if files.get(f, -1) < size]
            if not missing:
                break
        return files, missing

    # -- discovery + load ------------------------------------------------------------------
    @keeps_python_random
    def find_candidates(self) -> list[tuple[str, Manifest]]:
        """Rank 0 scans; all ranks get the complete checkpoints, newest first."""
        found = self._guarded(self._scan_complete) if self.info.is_main else None
        found = dist.broadcast_object(found)
        if isinstance(found, str):
            raise CheckpointError(f"listing {self.storage.describe()} failed: {found}")
        return found

    def _scan_complete(self) -> list[tuple[str, Manifest]]:
        statuses = scan(self.storage)
        found = [(s.name, s.manifest) for s in statuses if s.complete]
        newest = found[0][1].step if found else -1
        for s in statuses:
            if not s.complete and not s.empty and s.step > newest:
                self.emit("skipped_incomplete", level=logging.WARNING,
                          location=self.storage.describe(s.name), problem=s.problem)
        return found

    def load_latest(self, state_for: Callable[[Manifest], dict[str, Any]]
                    ) -> Optional[tuple[Manifest, dict[str, Any]]]:
        """Load the newest complete checkpoint that loads on every rank.

        ``state_for(manifest)`` builds the state dict to load into. Returns the manifest
        and the loaded state, or None when there is no complete checkpoint.
        """
        candidates = self.find_candidates()
        for name, manifest in candidates:
            differences = identity_differences(manifest.identity, self.identity)
            if differences:
                raise RunIdentityMismatch(
                    f"{self.storage.describe(name)} belongs to a different run: "
                    f"{'; '.join(differences)}. Use a new --ckpt.dir for this run (nothing "
                    "was changed or deleted).")
            state = state_for(manifest)
            error = None
            try:
                dcp.load(state, storage_reader=self.storage.dcp_reader(name))
            # DCP's CheckpointException is a BaseException; it carries every rank's error.
            except (Exception, CheckpointException) as exc:  # agreed on below; logged
                error = exc
            if not dist.any_rank(error is not None):
                return manifest, state
            self.emit("checkpoint_load_failed", level=logging.WARNING, step=manifest.step,
                      location=self.storage.describe(name),
                      error=self.storage.scrub(str(error)[:500]) if error else "another rank")
        if candidates:
            raise CheckpointError(
                f"none of the {len(candidates)} complete checkpoints in "
                f"{self.storage.describe()} could be loaded (see the warnings above); "
                "nothing was deleted. Move them away or use a new --ckpt.dir.")
        return None

    # -- retention -------------------------------------------------------------------------
    def prune(self) -> None:
        """Rank 0: keep the newest ``keep_last`` complete checkpoints; drop older debris."""
        statuses = scan(self.storage)
        complete = [s for s in statuses if s.complete]
        if not complete:
            return
        newest = complete[0].step
        doomed = complete[self.keep_last:]
        doomed += [s for s in statuses if not s.complete and s.step < newest]
        for status in doomed:
            try:
                self.storage.delete_tree(status.name)
                log.info("retention: removed %s", self.storage.describe(status.name))
            except Exception as exc:
                log.warning("retention: could not remove %s: %s",
                            self.storage.describe(status.name), self.storage.scrub(str(exc)))


def written_sizes(metadata: Any) -> dict[str, int]:
    """File name -> bytes DCP wrote into it, from the save's returned metadata (empty if
    the storage writer keeps no such record)."""
    sizes: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        path = getattr(info, "relative_path", None)
        if isinstance(path, str):
            sizes[path] = max(sizes.get(path, 0), int(info.offset) + int(info.length))
    return sizes


def _maybe_inject_fault(point: str, step: int, pause_here: bool = True) -> None:
    wanted = f"{point}@{step}"
    if wanted not in os.environ.get(FAULT_ENV, "").split(","):
        return
    if point.startswith("kill_"):
        log.error("test fault %s: killing this process", wanted)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    if point.startswith("pause_") and pause_here:
        marker = os.path.join(os.environ[PAUSE_ENV], wanted)
        open(marker, "w").close()
        log.warning("test fault %s: waiting until %s is deleted", wanted, marker)
        deadline = time.monotonic() + 300
        while os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
