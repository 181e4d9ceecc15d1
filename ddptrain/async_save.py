"""Background checkpoint writing: copy and write the state while training goes on.

How an async save runs (see :meth:`ddptrain.checkpoint.CheckpointManager.save_async`):

1. **Snapshot** (training thread, a few ms): the caller captures what changes before
   the next optimizer step (BatchNorm buffers, which every forward updates, RNG states,
   scheduler and scaler state) and hands over a function that adds the rest.
2. **Start** (one launcher thread per rank, in the background): rank 0 claims the step
   directory, every rank builds the full state (parameters and optimizer state change
   only in the optimizer step) and copies it into host buffers owned by the saver
   (pinned on CUDA). For a writer process that is one shared-memory buffer for the whole
   state (:mod:`ddptrain.shared_staging`), so handing it over passes one file descriptor
   rather than one per tensor. Then the *staging fence* opens:
   the training thread calls
   :meth:`~ddptrain.checkpoint.CheckpointManager.wait_for_staging` before its next
   optimizer step, so nothing that training does later can leak into the checkpoint.
   The ranks agree on success before any rank starts DCP's write, so a rank that failed
   here never leaves its peers waiting in a collective.
3. **Write**: ``dcp.async_save`` runs DCP's ordinary save on the copy in a thread
   (``thread``) or a long-lived helper process per rank (``process``; no GIL shared with
   training). All background collectives use a separate gloo process group, so they
   never interleave with the training thread's (DDP's all-reduces, the stop agreement).
4. **Done**: DCP's last step gathers every rank's write results on the coordinator, which
   writes ``.metadata`` and then broadcasts the outcome. So on *every* rank the write
   completes only after all ranks' shards are written (and fsynced) and ``.metadata``
   exists, and it fails on every rank when any rank failed. The manager commits (writes
   the manifest) only after that, on the training thread.

Staging buffers are reused between saves (``ckpt.cache_staging``); that is safe only
because at most one save is in flight and the next one waits for it before staging.

Limits:

* DCP starts its ``process`` helper on the first save, where spawning it (a new Python
  that imports torch and joins a process group) takes seconds of CPU from training.
  :class:`AsyncSaver` starts it at construction instead, in the launcher thread, and
  the trainer waits for it before its first step (:meth:`AsyncSaver.wait_until_ready`).
  That reaches into DCP's private ``_async_process_executor`` module; on a torch where
  those names are gone, DCP starts the helper lazily as before.
* In ``process`` mode a stop signal sent to the whole process group (Slurm signals every
  process of a step) also ends DCP's helper process; the save in flight then fails and
  is not committed, and the preemption checkpoint is written synchronously as usual.
  TODO: make the helper ignore stop signals once DCP lets us run code in it at startup
  (ignoring SIGTERM there today would make multiprocessing's exit handler, which
  terminates daemonic children with SIGTERM and joins them, hang).
* If a rank's ``process`` helper dies (OOM killer, kill -9), the ranks notice at the next
  async save (:meth:`CheckpointManager.async_usable`, one tiny all-reduce): every rank
  stops its helper, the save in flight is abandoned (never committed) and the rest of
  the run saves synchronously.
* TODO: if ``dcp.async_save`` itself raises on one rank after the ranks agreed to write,
  the other ranks' writes wait in a collective until the group's timeout.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from ddptrain.shared_staging import FlatSharedStager

log = logging.getLogger(__name__)


class SaverUnavailable(RuntimeError):
    """The background writer could not be started (``process`` mode)."""


@dataclass
class SaveJob:
    """One async save, as the launcher thread of this rank carries it out."""

    build_state: Callable[[], dict[str, Any]]  # the full state; runs in the background
    make_writer: Callable[[], Any]  # DCP storage writer for the step directory
    planner: Any  # DCP save planner
    claim: Optional[Callable[[], bool]]  # rank 0: may the save go ahead (else None)
    ready: Any = None  # CUDA event recorded at the save call (the state to copy)


@dataclass
class Outcome:
    """How a background save ended on this rank."""

    status: str  # "written" (on every rank) | "exists" (nothing to do) | "failed"
    error: Optional[BaseException] = None  # this rank's error; None if a peer failed
    metadata: Any = None  # DCP's Metadata of a written save (for the commit check)


@dataclass
class BackgroundWrite:
    """The futures of one async save on this rank."""

    staged: Future = field(default_factory=Future)  # the copy is done (or abandoned)
    done: Optional[Future] = None  # result: an Outcome; never raises


class _AlreadyStaged(AsyncStager):
    """Hands DCP the copy the launcher made, so that DCP does not copy it again."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def close(self) -> None:
        pass


class AsyncSaver:
    """Runs async saves, one at a time, from a launcher thread on every rank.

    Create it on every rank at the same point (it creates a process group). It does not
    enforce the one-save-in-flight rule; the checkpoint manager does.
    """

    def __init__(self, mode: str, device: torch.device, cache_staging: bool = True,
                 flat_staging: bool = True):
        if mode not in ("thread", "process"):
            raise ValueError(f"ckpt.async_mode={mode!r}: AsyncSaver runs thread or process")
        self.mode = mode
        self.kind = (AsyncCheckpointerType.PROCESS if mode == "process"
                     else AsyncCheckpointerType.THREAD)
        self.cuda = device.type == "cuda"
        # Pinned buffers make the device-to-host copy fast and are CUDA-only; a writer
        # process receives shared-memory buffers by handle instead of pickling them.
        self.options = StagingOptions(use_pinned_memory=self.cuda,
                                      use_shared_memory=mode == "process",
                                      use_async_staging=False,
                                      use_non_blocking_copy=self.cuda)
        self.cache_staging = cache_staging
        self._cached_stager: Optional[DefaultStager] = None
        # process mode: the state in one shared buffer, one descriptor to hand over
        # (ddptrain.shared_staging); DCP's per-tensor stager when that is switched off.
        self.flat_staging = mode == "process" and flat_staging
        self._flat_stager: Optional[FlatSharedStager] = None
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="ddptrain-ckpt")
        # Background collectives must not share a group with the training thread's.
        self.group = torch_dist.new_group(backend="gloo")
        # Queued first on the one launcher thread, so every save runs after it.
        self._helper: Optional[Future] = (self._launcher.submit(_start_dcp_helper, self.group)
                                          if mode == "process" else None)

    def wait_until_ready(self) -> Optional[float]:
        """Block until the ``process`` helper has started (call before the first step, on
        every rank). Returns the seconds its start took, or None if there was none to
        wait for; raises if it could not be started."""
        if self._helper is None:
            return None
        helper, self._helper = self._helper, None
        try:
            return helper.result()
        except Exception as exc:
            raise SaverUnavailable(f"ckpt.async_mode=process: DCP's checkpoint helper "
                                   f"process did not start ({exc}); use --ckpt.async_mode "
                                   f"thread or off") from exc

    def helper_alive(self) -> bool:
        """False once this rank's ``process`` helper has died (always True for
        ``thread``, and before the helper exists)."""
        process = _dcp_helper_process() if self.mode == "process" else None
        return process is None or process.is_alive()

    def stop_helper(self) -> None:
        """Kill this rank's ``process`` helper, so that no background write waits on it
        (after a peer's helper died: the helpers share a process group)."""
        process = _dcp_helper_process() if self.mode == "process" else None
        if process is not None and process.is_alive():
            process.kill()
            process.join(10)

    def start(self, job: SaveJob) -> BackgroundWrite:
        """Hand ``job`` to the launcher thread; returns at once (training thread)."""
        if self.cuda:
            job.ready = torch.cuda.current_stream().record_event()
        write = BackgroundWrite()
        write.done = self._launcher.submit(self._run, job, write.staged)
        return write

    def _run(self, job: SaveJob, staged: Future) -> Outcome:
        try:
            return self._save(job, staged)
        except BaseException as exc:  # a bug or a broken group: reported, not committed
            log.exception("async save failed in the launcher")
            return Outcome("failed", exc)
        finally:
            if not staged.done():
                staged.set_result(None)

    def _save(self, job: SaveJob, staged: Future) -> Outcome:
        verdict, error = 1, None
        if job.claim is not None:  # rank 0: 1 go, 0 complete already, 2 failed
            try:
                verdict = 1 if job.claim() else 0
            except Exception as exc:
                verdict, error = 2, exc
        verdict = self._broadcast_int(verdict)
        if verdict != 1:
            return Outcome("exists") if verdict == 0 else Outcome("failed", error)

        copy, stager = None, None
        try:
            writer = job.make_writer()
            copy, stager = self._stage(job.build_state(), job.ready)
        except Exception as exc:  # agreed on below
            error = exc
        staged.set_result(None)  # from here on training may change parameters again
        try:
            if self._max_int(int(error is not None)):
                return Outcome("failed", error)
            metadata = dcp.async_save(copy, storage_writer=writer, planner=job.planner,
                                      process_group=self.group,
                                      async_checkpointer_type=self.kind,
                                      async_stager=_AlreadyStaged()).result()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            return Outcome("failed", exc)
        finally:
            if stager is not None:
                stager.close()
        return Outcome("written", metadata=metadata)

    def _stage(self, state: dict[str, Any], ready) -> tuple[dict[str, Any], Any]:
        """Copy ``state`` into host buffers; returns the copy and a stager to close."""
        if self.flat_staging:
            if self._stream is not None:
                self._stream.wait_event(ready)
            staged = self._stage_flat(state)
            if staged is not None:
                return staged
        if self.cache_staging:
            if self._cached_stager is None:
                self._cached_stager = DefaultStager(self.options)
            stager, owned = self._cached_stager, None
        else:
            stager = owned = DefaultStager(self.options)
        if self._stream is None:
            return stager.stage(state), owned
        with torch.cuda.stream(self._stream):  # copy beside the training stream
            self._stream.wait_event(ready)
            return stager.stage(state), owned

    def _stage_flat(self, state: dict[str, Any]) -> Optional[tuple[dict[str, Any], Any]]:
        """``process`` mode: stage into one shared buffer (None: not stageable so)."""
        if self.cache_staging:
            if self._flat_stager is None:
                self._flat_stager = FlatSharedStager(pin=self.cuda)
            stager, owned = self._flat_stager, None
        else:
            stager = owned = FlatSharedStager(pin=self.cuda)
        if self._stream is None:
            copy = stager.stage(state)
        else:
            with torch.cuda.stream(self._stream):  # copy beside the training stream
                copy = stager.stage(state, non_blocking=True)
            self._stream.synchronize()
        if copy is None:
            if owned is not None:
                owned.close()
            return None
        return copy, owned

    def _broadcast_int(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int32)
        torch_dist.broadcast(tensor, src=0, group=self.group)
        return int(tensor.item())

    def _max_int(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int32)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX, group=self.group)
        return int(tensor.item())

    def close(self) -> None:
        """Stop the launcher (a save still running is not waited for) and free buffers."""
        self._launcher.shutdown(wait=False)
        if self._cached_stager is not None:
            self._cached_stager.close()
            self._cached_stager = None
        if self._flat_stager is not None:
            self._flat_stager.close()
            self._flat_stager = None


def _dcp_helper_process():
    """DCP's helper process (a multiprocessing.Process) of this rank, or None."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    return getattr(getattr(executor, "_CHECKPOINT_PROCESS", None), "_save_process", None)


def _start_dcp_helper(group) -> Optional[float]:
    """Start the helper process that DCP's process-based async save writes from, as DCP
    itself would on its first save (collective over ``group``). Returns the seconds it
    took, or None if this torch has no such module (DCP then starts it lazily)."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    process_class = getattr(executor, "_AsyncCheckpointProcess", None)
    init_info_class = getattr(executor, "_ProcessGroupInitInfo", None)
    if (process_class is None or init_info_class is None
            or getattr(executor, "_CHECKPOINT_PROCESS", "absent") is not None):
        return None
    started = time.monotonic()
    executor._CHECKPOINT_PROCESS = process_class(pg_init_info=init_info_class(group))
    return time.monotonic() - started


@dataclass
class InFlightSave:
    """An async save whose background work was started and is not yet committed."""

    name: str  # the step directory
    manifest: Any  # ddptrain.checkpoint.Manifest, written once the write is done
    write: BackgroundWrite
    started: float  # time.monotonic() when the save was asked for
    call_s: float = 0.0  # how long the save call blocked training
    staging_wait_s: Optional[float] = None  # how long the staging fence blocked it
    notes: list = field(default_factory=list)  # events from the launcher, for rank 0
