"""The checkpoint contract: save, commit, discovery, load with fallback, retention.

Layout under ``ckpt.dir`` (local path or fsspec URL)::

    step-00000120/  __0_0.distcp  __1_0.distcp  .metadata  manifest.json

1. A new directory per save, named by the zero-padded global step.
2. Every rank calls DCP save into it; DCP writes ``.metadata`` after all shards.
3. Rank 0 then checks that every file DCP reports as written is listed with (at least)
   the bytes written, and writes ``manifest.json`` last (JSON, atomically: rename on
   disk, one PUT on object stores): the commit marker. It names every file with its
   size. An async save (``save_async``)
   returns at once and is committed by ``poll``/``wait`` once its background write has
   finished on every rank; at most one is in flight (see ddptrain.async_save).
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

import logging
import time
import warnings
from typing import Any, Callable, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ddptrain import dist
from ddptrain.async_commit import AsyncSaves
from ddptrain.async_save import AsyncSaver, InFlightSave
from ddptrain.checkpoint_errors import (CheckpointError, RunIdentityMismatch, SaveError,
                                        error_text)
from ddptrain.faults import maybe_inject_fault, save_planner
from ddptrain.manifest import (FORMAT_VERSION, MANIFEST_NAME, STEP_DIR_PATTERN,
                               CheckpointStatus, Manifest, identity_differences,
                               parse_step, scan, step_dirname, verify)
from ddptrain.rng import keeps_python_random
from ddptrain.storage import Storage, StorageError

log = logging.getLogger(__name__)

#: The on-disk contract lives in ddptrain.manifest and the errors in
#: ddptrain.checkpoint_errors; their names are re-exported here.
__all__ = ["CheckpointError", "CheckpointManager", "SaveError", "CheckpointStatus",
           "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "RunIdentityMismatch",
           "STEP_DIR_PATTERN", "error_text", "identity_differences", "parse_step", "scan",
           "step_dirname", "verify"]

#: Listing attempts before a commit gives up on a file DCP wrote (eventual consistency).
LISTING_ATTEMPTS = 4


def _load_locally(state: dict[str, Any], reader) -> None:
    """DCP load without its plan collectives (faster resume): each rank reads what its own
    state dict needs; success is agreed on by the caller."""
    with warnings.catch_warnings():  # DCP warns that no_dist means a single process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)


class CheckpointManager(AsyncSaves):
    """Saves and finds checkpoints for one run; every method is called on all ranks.
    The async saves (``save_async``, ``poll``, ``wait``, ...) are in
    :class:`ddptrain.async_commit.AsyncSaves`."""

    def __init__(self, storage: Storage, info: dist.DistInfo, identity: dict[str, Any],
                 keep_last: int, emit: Callable[..., None],
                 thread_count: Optional[int] = None,
                 async_mode: str = "off", cache_staging: bool = True,
                 plan_caching: bool = True):
        self.storage = storage
        self.info = info
        self.identity = identity
        self.keep_last = keep_last
        self.emit = emit
        self.thread_count = thread_count
        self.plan_caching = plan_caching
        self.async_saver = (AsyncSaver(async_mode, info.device, cache_staging)
                            if async_mode != "off" else None)
        self._in_flight: Optional[InFlightSave] = None
        #: Steps whose complete checkpoint failed to load in this run: a save of such a
        #: step replaces the directory (the resumed run recomputed that very state).
        self._unloadable: set[int] = set()
        self._last_async: Optional[tuple[int, bool]] = None  # (step, committed here)

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

        Waits for an async save in flight first. Raises SaveError when the save
        failed on any rank (nothing is committed). Returns False without writing when a
        complete checkpoint of this step exists.
        """
        self._wait_in_flight()
        name = step_dirname(step)
        started = time.monotonic()
        maybe_inject_fault("pause_before_save", step, self.info.is_main)
        if not self._claim_dir(name):
            return False

        error, metadata = None, None
        try:
            metadata = dcp.save(state, storage_writer=self.storage.dcp_writer(
                name, self.thread_count), planner=save_planner(step, self.plan_caching))
        except (Exception, CheckpointException) as exc:  # agreed on below; reported
            error = exc
        if dist.any_rank(error is not None):
            raise SaveError(f"saving {self.storage.describe(name)} failed: "
                            f"{self.storage.scrub(error_text(error, 'on a peer'))}")
        maybe_inject_fault("kill_before_manifest", step)
        maybe_inject_fault("pause_before_manifest", step, self.info.is_main)

        manifest = self._manifest(step, epoch, samples_seen, global_batch_size, reason)
        error = self._commit(name, manifest, metadata) if self.info.is_main else None
        if dist.any_rank(error is not None):
            raise SaveError(f"committing {self.storage.describe(name)} failed: "
                            f"{error or 'on rank 0'}")
        self._report_commit(name, manifest, started, mode="sync")
        return True


    def close(self) -> None:
        """Release staging buffers; an async save still in flight is never committed."""
        if self._in_flight is not None:
            log.warning("abandoning the uncommitted async save of %s",
                        self.storage.describe(self._in_flight.name))
        if self.async_saver is not None:
            self.async_saver.close()

    def _claim_dir(self, name: str) -> bool:
        """All ranks: rank 0's verdict whether a save into ``name`` should go ahead."""
        ready = self._guarded(lambda: self._prepare_dir(name)) if self.info.is_main else None
        ready = dist.broadcast_object(ready)
        if isinstance(ready, str):
            raise SaveError(f"preparing {self.storage.describe(name)} failed: {ready}")
        return ready

    def _guarded(self, action: Callable[[], Any], warning: str = "") -> Any:
        """``action()``, or its scrubbed error as a string (logged when ``warning``)."""
        try:
            return action()
        except Exception as exc:
            message = self.storage.scrub(f"{type(exc).__name__}: {exc}")
            if warning:
                log.warning("%s: %s", warning, message)
            return message

    def _manifest(self, step: int, epoch: int, samples_seen: int, global_batch_size: int,
                  reason: str) -> Manifest:
        return Manifest(step=step, epoch=epoch, samples_seen=samples_seen,
                        world_size=self.info.world_size,
                        global_batch_size=global_batch_size, identity=self.identity,
                        reason=reason, files={})

    def _report_commit(self, name: str, manifest: Manifest, started: float, mode: str,
                       stall_s: Optional[float] = None) -> None:
        size = sum(manifest.files.values()) if self.info.is_main else None
        self.emit("checkpoint_committed", step=manifest.step, reason=manifest.reason,
                  seconds=round(time.monotonic() - started, 3), bytes=size, mode=mode,
                  stall_s=stall_s,  # async: save call + staging fence
                  location=self.storage.describe(name))
        if self.info.is_main:
            self._guarded(self.prune, "retention skipped")

    def _prepare_dir(self, name: str, emit: Optional[Callable[..., None]] = None) -> bool:
        """Rank 0: False if a complete checkpoint of this step exists; removes leftovers."""
        emit = emit or self.emit
        if not self.storage.exists(name):
            return True
        if self.storage.is_file(name):
            raise CheckpointError(f"{self.storage.describe(name)} is a file, not a "
                                  "checkpoint directory; move it out of ckpt.dir")
        status = verify(self.storage, name)
        # A directory of this step without a commit is the leftover of a crashed attempt;
        # a damaged or unloadable one has been recomputed by this run from an older one.
        if status.complete and status.step in self._unloadable:
            emit("replacing_unloadable", level=logging.WARNING, step=status.step,
                 message=f"{self.storage.describe(name)} failed to load at the start of "
                         "this run; replacing it with the state recomputed from an older "
                         "checkpoint")
        elif status.complete:
            emit("checkpoint_exists", step=status.step, level=logging.INFO,
                 message=f"{self.storage.describe(name)} is already complete (a rerun "
                         "reproduces the same state); not overwriting it")
            return False
        elif not status.empty:
            emit("removed_incomplete", level=logging.WARNING, step=status.step,
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
        """Rank 0 scans; all ranks get the complete checkpoints, newest first.

        Raises CheckpointError when there is none but some committed checkpoint has been
        damaged since: starting from scratch would overwrite it.
        """
        found = self._guarded(self._scan_complete) if self.info.is_main else None
        found = dist.broadcast_object(found)
        if isinstance(found, str):
            raise CheckpointError(f"listing {self.storage.describe()} failed: {found}")
        found, damaged = found
        if not found and damaged:
            raise CheckpointError(
                f"{self.storage.describe()} has no complete checkpoint, but committed ones "
                f"that are damaged: {'; '.join(damaged)}. Not starting from scratch over "
                "them: restore or move them away, or use a new --ckpt.dir (nothing was "
                "changed or deleted).")
        return found

    def _scan_complete(self) -> tuple[list[tuple[str, Manifest]], list[str]]:
        """Rank 0: the complete checkpoints and the damaged ones (as 'name: problem')."""
        statuses = scan(self.storage)
        found = [(s.name, s.manifest) for s in statuses if s.complete]
        newest = found[0][1].step if found else -1
        for s in statuses:
            if not s.complete and not s.empty and s.step > newest:
                self.emit("skipped_incomplete", level=logging.WARNING,
                          location=self.storage.describe(s.name), problem=s.problem)
        return found, [f"{s.name}: {s.problem}" for s in statuses if s.damaged]

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
                _load_locally(state, self.storage.dcp_reader(name))
            # DCP's CheckpointException is a BaseException; it carries every rank's error.
            except (Exception, CheckpointException) as exc:  # agreed on below; logged
                error = exc
            if not dist.any_rank(error is not None):
                return manifest, state
            self._unloadable.add(manifest.step)
            self.emit("checkpoint_load_failed", level=logging.WARNING, step=manifest.step,
                      location=self.storage.describe(name),
                      error=self.storage.scrub(error_text(error, "on another rank")))
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
