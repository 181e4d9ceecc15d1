"""Process-group setup from torchrun's environment and the few collectives the trainer needs.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the group is initialised from the
environment: gloo on CPU, and on CUDA a combined backend (NCCL for CUDA tensors, gloo for
CPU tensors and objects) with the device taken from LOCAL_RANK. Without torchrun the
program runs as a single process with a one-member gloo group, so the same code paths
(DDP, DCP, collectives) are used either way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """The global rank from torchrun's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(preference: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; "
                           "use --train.device cpu (or auto)")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Initialise the default process group and pick this rank's device."""
    device = resolve_device(device_preference)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        store = _restart_safe_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, timeout=timeout,
                                    rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
    else:
        store = dist.HashStore()
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1,
                                timeout=timeout)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device)
    log.debug("process group ready: rank %d/%d on %s (%s)", info.rank, info.world_size,
              device, backend)
    return info


def _restart_safe_store(timeout: timedelta) -> dist.Store | None:
    """The agent's store with this attempt's own key space, when torchrun shares it.

    torchrun hands its rendezvous TCPStore to the workers (TORCHELASTIC_USE_AGENT_STORE)
    and that store outlives a restart (--max-restarts): restarted workers would read the
    previous attempt's process-group addresses and connect to dead peers. On one node all
    workers see the same TORCHELASTIC_RESTART_COUNT, so keys are namespaced by it. Nodes
    can disagree on that count, so with several nodes the launcher must set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt; slurm/ does).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and launched_rank() == 0:
            log.warning("torchrun --max-restarts with several nodes needs "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, "
                        "else restarted workers connect to the previous attempt's peers")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ddptrain/attempt-{attempt}/", store)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one rank (one tiny all-reduce)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of a few floats over all ranks."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


def max_over_ranks(value: float) -> float:
    """The largest of one float over all ranks."""
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of a few floats over all ranks."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
