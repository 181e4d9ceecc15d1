"""B2, B3, B6 and the checkpoint knob sweep: one torchrun job, subjects and references
interleaved in every repetition.

It builds ddptrain's Trainer from ddptrain options (e.g. ResNet-50 + SGD momentum) and
trains two steps so the optimizer holds its momentum buffers. Then every repetition runs
each variant once, in this order, each timed from a barrier to the moment the slowest
rank is done (the wall time a training loop would lose):

* ``sync``: ``Trainer.save`` with ``ckpt.async_mode off`` (DCP save, fsync, manifest)
* ``raw``: every rank writes and fsyncs as many bytes as it wrote in ``sync``
* ``thread`` / ``process``: the stall of an async save: the ``Trainer.save`` call plus
  the staging fence in the next training step (the copy overlaps that step's
  forward/backward); recorded with it: ``call_s``, ``fence_s``, and from training on
  until the save is committed, then as many steps without a save: ``steps_during``,
  ``during_s``, ``plain_s`` and ``extra_s`` (what the save cost the loop besides the
  stall)
* ``train_step``: a training step with no save in flight (compare ``step_s``)
* ``torch_save``: rank 0 ``torch.save`` of model + optimizer state dicts, others wait
  at a barrier (the single-file recipe; no fsync, as the recipe is usually written)
* knobs, each a direct ``dcp.save`` of the same state: ``dcp_default`` (ddptrain's
  writer settings), ``threads_2``, ``threads_4``, ``file_per_tensor``, ``no_fsync``,
  ``plan_cache``, ``no_crc32`` (torch.save without zip CRC-32s, which torch.load never
  checks), ``thread_nocache`` (async thread stall without cached staging) and
  ``process_per_tensor`` (async process with DCP's stager: one shared-memory segment,
  and so one file descriptor to hand over, per tensor).

Writes ``{"bytes": ..., "variants": {name: {"seconds": [...], ...}}}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ddptrain import dist as ddp_dist
from ddptrain.checkpoint import CheckpointManager
from ddptrain.config import parse_config, validate_for_world
from ddptrain.storage import Storage
from ddptrain.trainer import Trainer

CHUNK = 16 << 20


def wall(fn: Callable[[], object]) -> float:
    """Seconds from a common start until the slowest rank has finished ``fn``."""
    dist.barrier()
    started = time.perf_counter()
    fn()
    local = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return local.item()


class Bench:
    def __init__(self, trainer: Trainer, work_dir: str):
        self.trainer = trainer
        self.rank = trainer.info.rank
        self.work_dir = work_dir
        self.step = 1000
        self.results: dict[str, dict] = {}
        self.managers = {"sync": self._manager("sync"),
                         "thread": self._manager("thread", "thread"),
                         "process": self._manager("process", "process"),
                         "thread_nocache": self._manager("nocache", "thread", False),
                         "process_per_tensor": self._manager("per-tensor", "process")}
        # DCP's own stager (a shared-memory segment per tensor) instead of ddptrain's one
        # shared buffer, to show what handing the state to the helper costs either way.
        self.managers["process_per_tensor"].async_saver.flat_staging = False
        self.random = os.urandom(CHUNK)
        self.batches = iter(())

    def _manager(self, sub: str, mode: str = "off", cache: bool = True
                 ) -> CheckpointManager:
        storage = Storage(os.path.join(self.work_dir, sub))
        if self.rank == 0:
            storage.makedirs()
        return CheckpointManager(storage, self.trainer.info, self.trainer.run_identity(),
                                 keep_last=10_000, emit=self.trainer.logger.event,
                                 async_mode=mode, cache_staging=cache)

    def record(self, name: str, seconds: float, **extra: float) -> None:
        row = self.results.setdefault(name, {"seconds": []})
        row["seconds"].append(seconds)
        for key, value in extra.items():
            row.setdefault(key, []).append(value)

    def clean(self, path: str) -> None:
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    # -- ddptrain's own save path ---------------------------------------------------------
    def train_step(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:  # first call, or the epoch ran out
            self.batches = self.trainer._epoch_batches()
            batch = next(self.batches)
        self.trainer.train_step(*batch)

    def trainer_save(self, variant: str) -> None:
        manager, trainer = self.managers[variant], self.trainer
        trainer.ckpt, trainer.step = manager, self.step
        self.step += 1
        call = wall(lambda: trainer.save("interval"))
        if manager.async_saver is None:
            self.record(variant, call)
        else:
            during = self.train_while_saving(manager)
            self.record(variant, call + during["fence_s"], call_s=call, **during)
        if variant == "sync":
            self.last_sync_dir = manager.storage.path(f"step-{trainer.step:08d}")
            self.measure_bytes()
        self.clean(manager.storage.path())
        if self.rank == 0:
            manager.storage.makedirs()

    def train_while_saving(self, manager: CheckpointManager) -> dict[str, float]:
        """Train on until the async save in flight is committed on every rank, then the
        same number of steps without a save: the difference is what the save cost the
        training loop besides its stall (shared cores, memory bandwidth, GIL)."""
        steps, started = 0, time.perf_counter()
        dist.barrier()
        while True:
            self.train_step()  # the first one's optimizer step waits for the staging copy
            if steps == 0:
                fence = manager.in_flight.staging_wait_s or 0.0
            steps += 1
            manager.poll()
            pending = torch.tensor([int(manager.in_flight is not None)])
            dist.all_reduce(pending, op=dist.ReduceOp.MAX)
            if not pending.item():
                break
        during = time.perf_counter() - started
        plain = wall(lambda: [self.train_step() for _ in range(steps)])
        times = torch.tensor([fence, during], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        return {"fence_s": times[0].item(), "steps_during": steps,
                "during_s": times[1].item(), "plain_s": plain,
                "extra_s": times[1].item() - plain}

    def measure_bytes(self) -> None:
        files = {f: os.path.getsize(os.path.join(self.last_sync_dir, f))
                 for f in os.listdir(self.last_sync_dir)}
        mine = files.get(f"__{self.rank}_0.distcp", 0)
        if self.rank == 0:  # rank 0 also writes .metadata and the manifest
            mine += files.get(".metadata", 0) + files.get("manifest.json", 0)
        self.my_bytes = mine
        self.total_bytes = sum(files.values())

    # -- references -----------------------------------------------------------------------
    def raw_write(self) -> None:
        path = os.path.join(self.work_dir, "raw")
        os.makedirs(path, exist_ok=True)

        def write() -> None:
            with open(os.path.join(path, f"rank{self.rank}.bin"), "wb") as f:
                left = self.my_bytes
                while left > 0:
                    left -= f.write(memoryview(self.random)[:min(CHUNK, left)])
                f.flush()
                os.fsync(f.fileno())

        self.record("raw", wall(write))
        self.clean(path)

    def torch_save(self) -> None:
        path = os.path.join(self.work_dir, "single-file")
        os.makedirs(path, exist_ok=True)
        module, optimizer = self.trainer.module, self.trainer.optimizer

        def save() -> None:
            if self.rank == 0:
                torch.save({"model": module.state_dict(), "optimizer":
                            optimizer.state_dict()}, os.path.join(path, "checkpoint.pt"))
            dist.barrier()

        self.record("torch_save", wall(save))
        self.clean(path)

    # -- knobs: direct DCP saves of the same state ----------------------------------------
    def dcp_knob(self, name: str, planner=None, crc32: bool = True, **writer_options
                 ) -> None:
        path = os.path.join(self.work_dir, name)
        options = {"sync_files": True, "thread_count": 1, **writer_options}
        state = self.trainer.state.full(self.trainer.step)
        torch.serialization.set_crc32_options(crc32)
        try:
            self.record(name, wall(lambda: dcp.save(
                state, storage_writer=FileSystemWriter(path, **options),
                planner=planner or DefaultSavePlanner())))
        finally:
            torch.serialization.set_crc32_options(True)
        self.clean(path)

    def repetition(self) -> None:
        self.trainer_save("sync")
        self.raw_write()  # the same number of bytes per rank as "sync" just wrote
        for variant in ("thread", "process", "thread_nocache", "process_per_tensor"):
            self.trainer_save(variant)
        self.record("train_step", wall(self.train_step))
        self.torch_save()
        self.dcp_knob("dcp_default")
        self.dcp_knob("threads_2", thread_count=2)
        self.dcp_knob("threads_4", thread_count=4)
        self.dcp_knob("file_per_tensor", single_file_per_rank=False)
        self.dcp_knob("no_fsync", sync_files=False)
        self.dcp_knob("plan_cache", planner=DefaultSavePlanner(enable_plan_caching=True))
        self.dcp_knob("no_crc32", crc32=False)
        self.dcp_knob("threads_4_plan_cache", thread_count=4,
                      planner=DefaultSavePlanner(enable_plan_caching=True))


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint benchmarks (torchrun worker)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--reps", type=int, default=5)
    args, ddptrain_args = parser.parse_known_args()

    cfg = parse_config(ddptrain_args + ["--run.dir", os.path.join(args.work_dir, "run")])
    info = ddp_dist.init_distributed(cfg.train.device)
    validate_for_world(cfg, info.world_size)
    trainer = Trainer(cfg, info)
    bench = Bench(trainer, args.work_dir)
    for _ in range(2):  # momentum buffers exist after the first optimizer step
        bench.train_step()
    bench.repetition()  # warm-up: first-save costs (buffers, helper process, plans)
    warmup = {name: row["seconds"][0] for name, row in bench.results.items()}
    bench.results = {}
    for _ in range(args.reps):
        bench.repetition()
    if info.rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"bytes": bench.total_bytes, "variants": bench.results,
                       "warmup": warmup}, f, indent=1)
    for manager in bench.managers.values():
        manager.close()
    ddp_dist.teardown()


if __name__ == "__main__":
    main()
