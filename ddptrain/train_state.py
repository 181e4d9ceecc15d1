"""What a checkpoint holds of a run, how it is taken and how it is put back.

The state is keyed by name, never by position: ``model`` (parameters and buffers of the
unwrapped module), ``optim`` (by parameter name, via DCP's ``get_state_dict``),
``scheduler``, ``scaler``, ``progress`` (step, samples seen) and ``rng/rank<r>`` (each
rank's generators). Parameters and optimizer state change only in the optimizer step;
everything else may change before it (BatchNorm statistics in every forward), which is
what lets an async save copy the former in the background (see :meth:`async_builder`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ddptrain import dist, rng


class TrainState:
    """The checkpointed state of one rank's model, optimizer, scheduler and scaler."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler,
                 info: dist.DistInfo, global_batch_size: int):
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.info = info
        self.global_batch_size = global_batch_size

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP's next forward
        would, so what DCP writes once under a shared key is the same on all ranks."""
        if self.info.world_size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in self.module.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for buffers in by_dtype.values():  # one broadcast per dtype, not one per buffer
            flat = torch.cat([b.reshape(-1) for b in buffers])
            torch_dist.broadcast(flat, src=0)
            for buffer, part in zip(buffers, flat.split([b.numel() for b in buffers])):
                buffer.copy_(part.view_as(buffer))

    # -- taking it -------------------------------------------------------------------------
    def full(self, step: int, include_rng: bool = True) -> dict[str, Any]:
        """The whole state as of now (for a synchronous save, or as a load template)."""
        return self.add_weights(self.volatile(step, include_rng))

    def volatile(self, step: int, include_rng: bool = True) -> dict[str, Any]:
        """Copies of the state that changes before the next optimizer step: buffers
        (BatchNorm statistics change in every forward), scheduler, scaler, progress, RNG."""
        state = {"buffers": {n: b.detach().clone() for n, b in self.module.named_buffers()},
                 "scheduler": copy.deepcopy(self.scheduler.state_dict()),
                 "scaler": self.scaler.state_dict(),
                 "progress": {"step": step, "samples_seen": step * self.global_batch_size}}
        if include_rng:
            state[f"rng/rank{self.info.rank}"] = rng.capture(self.info.device)
        return state

    def add_weights(self, volatile: dict[str, Any]) -> dict[str, Any]:
        """The full state: ``volatile`` plus parameters and optimizer state (which change
        only in the optimizer step), keyed by parameter name."""
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        buffers = volatile["buffers"]
        rest = {k: v for k, v in volatile.items() if k != "buffers"}
        return {"model": {k: buffers.get(k, v) for k, v in model_state.items()},
                "optim": optim_state, **rest}

    def async_builder(self, step: int) -> Callable[[], dict[str, Any]]:
        """For an async save: snapshot the volatile state now; parameters and optimizer
        state are read in the background before this rank's next optimizer step, which
        waits for them (CheckpointManager.wait_for_staging)."""
        volatile = self.volatile(step)
        if not self.optimizer.state:  # get_state_dict would initialise it with a step
            state = self.add_weights(volatile)
            return lambda: state
        return functools.partial(self.add_weights, volatile)

    # -- putting it back -------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> tuple[int, dict[str, tuple[Any, Any]]]:
        """Load ``state`` (as read into a :meth:`full` template) into the live objects.

        Returns the saved progress step and the LR-schedule settings whose saved value
        differs from the configured one (name -> (saved, configured)): the schedule
        resumes as saved, for exactness.
        """
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        configured = vars(self.scheduler.lr_lambdas[0]).copy()
        self.scheduler.load_state_dict(state["scheduler"])
        restored = vars(self.scheduler.lr_lambdas[0])
        changed = {k: (restored[k], v) for k, v in configured.items()
                   if restored.get(k) != v}
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng_key = f"rng/rank{self.info.rank}"
        if rng_key in state:
            rng.restore(state[rng_key], self.info.device)
        return int(state["progress"]["step"]), changed
