"""The async half of :class:`ddptrain.checkpoint.CheckpointManager`: start a background
save, fence the next optimizer step on its staging copy, and commit it once it has been
written on every rank (the background work itself is in :mod:`ddptrain.async_save`).

:class:`AsyncSaves` is a mixin of the manager; it uses the manager's ``storage``,
``info``, ``emit``, ``thread_count``, ``plan_caching``, ``async_saver``, ``_in_flight``
and ``_last_async``, and its ``_prepare_dir``, ``_manifest``, ``_commit`` and
``_report_commit``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Optional

from ddptrain import dist
from ddptrain.async_save import InFlightSave, SaveJob, SaverUnavailable
from ddptrain.checkpoint_errors import SaveError, error_text
from ddptrain.faults import fault_configured, maybe_inject_fault, save_planner
from ddptrain.manifest import step_dirname


def _collect(notes: list) -> Callable[..., None]:
    """An ``emit`` that keeps events in ``notes`` (for threads that must not log)."""
    return lambda *args, **kwargs: notes.append((args, kwargs))


class AsyncSaves:
    """Async saves of a checkpoint manager; every method is called on all ranks."""

    def save_async(self, build_state: Callable[[], dict[str, Any]], *, step: int,
                   epoch: int, samples_seen: int, global_batch_size: int,
                   reason: str) -> None:
        """Save in the background once the previous async save has finished (no wait
        otherwise). ``build_state()`` runs in the background and must return the state as
        of now: the caller snapshots what changes before its next optimizer step and calls
        :meth:`wait_for_staging` before that step. :meth:`poll`/:meth:`wait` commit."""
        assert self.async_saver is not None, "save_async needs ckpt.async_mode on"
        started = time.monotonic()
        self._wait_in_flight()
        waited = time.monotonic() - started
        name = step_dirname(step)
        flight = InFlightSave(name, self._manifest(step, epoch, samples_seen,
                                                   global_batch_size, reason),
                              write=None, started=started)
        # Rank 0 claims the directory in the launcher thread; its events are kept for later.
        claim = (functools.partial(self._prepare_dir, name, emit=_collect(flight.notes))
                 if self.info.is_main else None)
        flight.write = self.async_saver.start(SaveJob(
            build_state, lambda: self.storage.dcp_writer(name, self.thread_count),
            save_planner(step, self.plan_caching), claim))
        flight.call_s = time.monotonic() - started
        self._in_flight, self._last_async = flight, None
        self.emit("checkpoint_started", step=step, reason=reason,
                  call_s=round(flight.call_s, 4), waited_s=round(waited, 4),
                  mode=self.async_saver.mode, location=self.storage.describe(name))

    def async_usable(self, step: int) -> bool:
        """Collective, before every async save: whether async saving still works on
        every rank. Once a ``process`` helper has died on any rank, every rank stops its
        helper and abandons the save in flight, and this is False for the rest of the run
        (saves are then synchronous)."""
        if self.async_saver is None:
            return False
        if fault_configured("kill_async_helper", step) and self.info.rank == \
                self.info.world_size - 1:
            self.async_saver.stop_helper()  # test fault: as if the OOM killer took it
        if not dist.any_rank(not self.async_saver.helper_alive()):
            return True
        abandoned = self._in_flight.name if self._in_flight is not None else None
        self.emit("async_saving_lost", level=logging.WARNING, step=step,
                  abandoned=abandoned and self.storage.describe(abandoned),
                  message="DCP's checkpoint helper process died on a rank; the save in "
                          "flight (if any) is abandoned and never committed, and the rest "
                          "of this run saves synchronously")
        self.async_saver.stop_helper()
        self._in_flight = None  # never committed; wait() and poll() look no further
        self.async_saver.close()
        self.async_saver = None
        return False

    @property
    def in_flight(self) -> Optional[InFlightSave]:
        """The async save in flight (read-only; for reports and benchmarks)."""
        return self._in_flight

    def wait_until_ready(self) -> Optional[SaveError]:
        """Before the first step, on every rank: let the async saver's helper process
        finish starting, so that it does not take CPU from training (``process`` mode
        only). Returns None when ready on every rank, else the error (collective)."""
        seconds, error = None, None
        try:
            seconds = self.async_saver.wait_until_ready() if self.async_saver else None
        except SaverUnavailable as exc:
            error = SaveError(str(exc))
        if seconds is not None:
            self.emit("async_helper_started", seconds=round(seconds, 3),
                      message=f"DCP's checkpoint helper process started in {seconds:.1f} s")
        if self.async_saver is not None and dist.any_rank(error is not None):
            return error or SaveError("ckpt.async_mode=process: DCP's checkpoint helper "
                                      "process did not start on another rank")
        return None

    def wait_for_staging(self) -> None:
        """Block until the async save in flight has copied the state; call it before the
        optimizer step (anything that changes parameters or optimizer state)."""
        flight = self._in_flight
        if flight is None or flight.staging_wait_s is not None:
            return
        waited_from = time.monotonic()
        flight.write.staged.result()
        flight.staging_wait_s = time.monotonic() - waited_from

    def poll(self) -> None:
        """Commit the async save in flight if its background write has finished. No
        collective: DCP completes the write on every rank only once all ranks' shards and
        ``.metadata`` are written (see ddptrain.async_save)."""
        if self._in_flight is not None and self._in_flight.write.done.done():
            self._finish_in_flight()

    def wait(self) -> Optional[int]:
        """Collective: let the async save in flight finish and commit (or fail). Returns
        the step of the last async save if it committed on every rank, else None."""
        if self.async_saver is None:
            return None
        self._wait_in_flight()
        step, ok = self._last_async or (None, True)
        failed = dist.any_rank(not ok)
        return None if failed else step

    def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.write.done.result()
            self._finish_in_flight()

    def _finish_in_flight(self) -> None:
        """This rank's end of an async save: rank 0 commits it if it was written."""
        flight, self._in_flight = self._in_flight, None
        step, outcome = flight.manifest.step, flight.write.done.result()
        for args, kwargs in flight.notes:
            self.emit(*args, **kwargs)
        error = outcome.error
        if outcome.status == "written":
            maybe_inject_fault("kill_before_manifest", step)
            if self.info.is_main:
                error = self._commit(flight.name, flight.manifest, outcome.metadata)
        self._last_async = (step, outcome.status != "failed" and error is None)
        if outcome.status == "written" and error is None:
            stall = flight.call_s + (flight.staging_wait_s or 0.0)
            self._report_commit(flight.name, flight.manifest, flight.started,
                                mode=self.async_saver.mode, stall_s=round(stall, 4))
        elif not self._last_async[1]:
            self.emit("checkpoint_failed", level=logging.ERROR, step=step,
                      reason=flight.manifest.reason,
                      message=f"background save of {self.storage.describe(flight.name)} "
                              f"failed, not committed: "
                              f"{self.storage.scrub(error_text(error, 'on a peer'))}")
