"""Background checkpoint writing: stage on the training thread, write in a thread/process.

How an async save runs (see :meth:`ddptrain.checkpoint.CheckpointManager.save_async`):

1. **Stage** (training thread, blocking): every tensor of the state is copied into host
   buffers owned by the saver (pinned on CUDA; shared memory for a writer process). When
   this returns, the next optimizer step can no longer change what gets written.
2. **Write** (background): ``dcp.async_save`` runs DCP's ordinary save on the staged copy
   in a thread (``thread``) or a long-lived helper process (``process``). Its collectives
   use a separate gloo process group, so they never interleave with the training
   thread's collectives (DDP's all-reduces, the stop agreement) on the default group.
3. **Done**: DCP's last step gathers every rank's write results on the coordinator, which
   writes ``.metadata`` and then broadcasts the outcome. So on *every* rank the future
   completes only after all ranks' shards are written (and fsynced) and ``.metadata``
   exists, and it raises on every rank when any rank failed. The manager commits (writes
   the manifest) only after that.

Staging buffers can be reused between saves (``ckpt.cache_staging``); that is safe only
because at most one save is in flight and the next one waits for it before staging.

Limits:

* TODO: stage asynchronously on CUDA (DCP's ``use_async_staging``), overlapping the
  device-to-host copy with the next forward/backward and waiting for it only before the
  optimizer step; today the copy is part of the stall.
* TODO: start the ``process`` helper at startup instead of on the first save (it takes a
  few seconds there, and a save asked for meanwhile waits for it).
* In ``process`` mode a stop signal sent to the whole process group (Slurm signals every
  process of a step) also ends DCP's helper process; the save in flight then fails and
  is not committed, and the preemption checkpoint is written synchronously as usual.
  TODO: make the helper ignore stop signals once DCP lets us run code in it at startup
  (ignoring SIGTERM there today would make multiprocessing's exit handler, which
  terminates daemonic children with SIGTERM and joins them, hang).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from ddptrain import dist

log = logging.getLogger(__name__)

@dataclass
class InFlightSave:
    """An async save whose background write was started and is not yet committed."""

    name: str  # the step directory
    manifest: Any  # ddptrain.checkpoint.Manifest, written once the future is done
    future: Future
    started: float  # time.monotonic() when the save was asked for
    stager: Optional[Any]  # to close once written (None: buffers cached by the saver)


class _AlreadyStaged(AsyncStager):
    """Hands DCP a state dict that :class:`AsyncSaver` has staged already (no 2nd copy)."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def close(self) -> None:
        pass


class AsyncSaver:
    """Stages state and runs DCP's async save in a thread or a helper process.

    Create it on every rank at the same point (it creates a process group). It does not
    enforce the one-save-in-flight rule; the checkpoint manager does.
    """

    def __init__(self, mode: str, device: torch.device, cache_staging: bool = True):
        if mode not in ("thread", "process"):
            raise ValueError(f"ckpt.async_mode={mode!r}: AsyncSaver runs thread or process")
        self.mode = mode
        self.kind = (AsyncCheckpointerType.PROCESS if mode == "process"
                     else AsyncCheckpointerType.THREAD)
        cuda = device.type == "cuda"
        # Pinned buffers make the device-to-host copy fast and are CUDA-only; a writer
        # process receives shared-memory buffers by handle instead of pickling them.
        self.options = StagingOptions(use_pinned_memory=cuda,
                                      use_shared_memory=mode == "process",
                                      use_async_staging=False, use_non_blocking_copy=cuda)
        self.cache_staging = cache_staging
        self._cached_stager: Optional[DefaultStager] = None
        # Background collectives must not share a group with the training thread's.
        self.group = torch_dist.new_group(backend="gloo")

    def start(self, state: dict[str, Any], make_writer: Callable[[], Any], planner
              ) -> tuple[Optional[Future], Optional[Any], bool, Optional[BaseException]]:
        """All ranks together: stage ``state``, then start writing it in the background.

        Returns ``(future, stager, failed, error)``: the future of the write (its result
        is DCP's metadata), the stager to close once it is written (None when buffers are
        cached), whether staging or starting failed on any rank, and this rank's error.
        Each phase is agreed on before the next: a rank must never start background
        collectives that its peers will not join.
        """
        error, staged, stager, future = None, None, None, None
        try:
            staged, stager = self._stage(state)
        except Exception as exc:  # agreed on below; returned
            error = exc
        if not dist.any_rank(error is not None):
            try:
                future = self._launch(staged, make_writer(), planner)
            except (Exception, CheckpointException) as exc:  # agreed on below
                error = exc
        if dist.any_rank(error is not None):
            if stager is not None:
                stager.close()
            return None, None, True, error
        return future, stager, False, None

    def _stage(self, state: dict[str, Any]) -> tuple[dict[str, Any], Optional[Any]]:
        if self.cache_staging:
            if self._cached_stager is None:
                self._cached_stager = DefaultStager(self.options)
            return self._cached_stager.stage(state), None
        stager = DefaultStager(self.options)
        return stager.stage(state), stager

    def _launch(self, staged: dict[str, Any], writer, planner) -> Future:
        result = dcp.async_save(staged, storage_writer=writer, planner=planner,
                                process_group=self.group, async_checkpointer_type=self.kind,
                                async_stager=_AlreadyStaged())
        # With a non-blocking stager DCP returns a response object; ours always blocks.
        return getattr(result, "upload_completion", result)

    def close(self) -> None:
        if self._cached_stager is not None:
            self._cached_stager.close()
            self._cached_stager = None


def wait_quietly(future: Future) -> None:
    """Wait for ``future`` without raising; its exception is read separately."""
    try:
        future.result()
    except BaseException:  # DCP's CheckpointException is a BaseException
        pass
