"""The training loop: resume -> for each step {batch, step, log, eval, save, stop?} -> final.

Exactness: the data order, augmentation and LR are functions of the step; everything else
that evolves (weights, optimizer, scheduler, scaler, RNGs) is in the checkpoint. So a run
killed anywhere and restarted reproduces an uninterrupted run bit for bit (same world
size, CPU).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddptrain import dist, rng
from ddptrain.checkpoint import CheckpointError, CheckpointManager, Manifest
from ddptrain.config import Config, ConfigError, config_to_dict
from ddptrain.data import (ResumableSampler, ShardSampler, build_datasets, make_loader,
                           resolve_kind, verify_readable)
from ddptrain.metrics import RunLogger, SampleRecorder, seconds_since_process_start
from ddptrain.model import build_model, input_channels
from ddptrain.optim import build_optimizer, build_scheduler
from ddptrain.preemption import (StopRequest, install_test_signal, start_launcher_watch,
                                 start_notice_watcher)
from ddptrain.run_files import ExitCode, check_run_dir, write_resolved_config, write_status
from ddptrain.storage import MiB, Storage
from ddptrain.train_state import TrainState

log = logging.getLogger(__name__)

class Trainer:
    def __init__(self, cfg: Config, info: dist.DistInfo):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.step = 0
        self.evaluated_step = -1
        self.saved_step = -1
        self.preempted = False  # the run is stopping on request (stop_for_preemption)
        # First, so that a stop signal during the (possibly slow) setup is not fatal.
        self.stop = StopRequest(cfg.preempt.signals)
        check_run_dir(cfg.run.dir)

        self._build_data()
        self._build_model()
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.optimizer = build_optimizer(cfg.optim, self.module)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer,
                                         cfg.train.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.train.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.state = TrainState(self.module, self.optimizer, self.scheduler, self.scaler,
                                info, cfg.train.global_batch_size)

        self.storage = Storage(cfg.ckpt_dir, cfg.ckpt.storage_options,
                               block_size=cfg.ckpt.block_size_mb * MiB)
        self.logger = RunLogger(cfg.run.dir, info.is_main, self.total_steps,
                                cfg.log.progress_bar, cfg.log.tensorboard)
        self.samples = SampleRecorder(cfg.run.dir, info.rank, cfg.log.sample_ids)
        self.ckpt = CheckpointManager(self.storage, info, self.run_identity(),
                                      cfg.ckpt.keep_last, self.logger.event,
                                      cfg.ckpt.thread_count, cfg.ckpt.async_mode,
                                      cfg.ckpt.cache_staging, cfg.ckpt.plan_caching)
        self.first_step_pending = True
        install_test_signal(self.module, lambda: self.step + 1, info.rank)
        self.notice_watcher = start_notice_watcher(
            cfg.preempt.notice, cfg.preempt.notice_url, cfg.preempt.poll_seconds, self.stop,
            info.local_rank)
        self.launcher_watch = start_launcher_watch(self.stop)

    # -- construction ----------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg, info = self.cfg, self.info
        self.data = build_datasets(cfg.data, cfg.run.seed, input_channels(cfg.model.name))
        if cfg.data.verify_images:
            verify_readable(self.data, info.rank, info.world_size)
        global_batch = cfg.train.global_batch_size
        self.steps_per_epoch = len(self.data.train) // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={global_batch} is larger than the "
                             f"training split ({len(self.data.train)} samples); lower it")
        self.micro_batch = global_batch // (info.world_size * cfg.train.grad_accum_steps)

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        module = build_model(cfg.model.name, self.data.num_classes, self.data.channels)
        module = module.to(self.device)
        if cfg.model.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(module, device_ids=device_ids)
        # Per-rank streams for dropout etc.; saved and restored with every checkpoint.
        rng.seed_all(cfg.run.seed * 1000 + 1 + self.info.rank)

    def run_identity(self) -> dict[str, Any]:
        """Config parts that define the model and the data order; resume requires equality."""
        cfg = self.cfg
        root = os.path.abspath(cfg.data.root) if cfg.data.root else None
        return {"model.name": cfg.model.name, "data.dataset": resolve_kind(cfg.data),
                "data.root": root, "data.val_fraction": cfg.data.val_fraction,
                "data.split_seed": cfg.data.split_seed, "data.image_size":
                self.data.image_size, "num_classes": self.data.num_classes,
                "run.seed": cfg.run.seed,
                "train.global_batch_size": cfg.train.global_batch_size}

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> ExitCode:
        self._prepare_run()
        self.resume()
        # Only now: a run refused on resume (another run's checkpoints) changes nothing.
        self._write_resolved_config()
        if self._stopped_during_setup():
            return self.stop_for_preemption()
        self.logger.start_at(self.step)
        while self.step < self.total_steps:
            for micro_batches, data_wait in self._epoch_batches():
                self.train_step(micro_batches, data_wait)
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end and ((self.epoch_of(self.step) + 1)
                                  % self.cfg.train.eval_every_epochs == 0
                                  or self.step >= self.total_steps):
                    self.evaluate()
                self.maybe_save(epoch_end)
                if self.step >= self.total_steps:
                    break  # a stop request now changes nothing: finish() saves anyway
                if self.stop.agreed():
                    return self.stop_for_preemption()
        return self.finish()

    def _stopped_during_setup(self) -> bool:
        """Collective: whether to stop before the first step, for a stop signal during
        setup; else wait until the async saver is ready. A run with nothing left to train
        just finishes."""
        if self.step >= self.total_steps:
            return False
        if self.stop.agreed():
            return True
        error = self.ckpt.wait_until_ready()
        if error is None:
            return False
        # A stop signal to the whole process group (Slurm) also ends a helper that was
        # still starting: that is the stop, not a failure.
        if self.stop.agreed():
            return True
        raise error

    def _prepare_run(self) -> None:
        self.ckpt.probe()  # all ranks: write, read back, delete a tiny object
        self.logger.event("run_started", world_size=self.info.world_size,
                          device=str(self.device), data=self.data.description,
                          model=self.cfg.model.name, total_steps=self.total_steps,
                          checkpoints=self.storage.describe(),
                          slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                          slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT"),
                          torchrun_restart_count=os.environ.get("TORCHELASTIC_RESTART_COUNT"))
        self._write_status("running")

    def _write_resolved_config(self) -> None:
        if self.info.is_main:
            write_resolved_config(self.cfg.run.dir, config_to_dict(self.cfg))

    def finish(self) -> ExitCode:
        if self.evaluated_step != self.step:
            self.evaluate()
        self.save("final")
        self.logger.event("training_complete", step=self.step)
        self._write_status("finished")
        return ExitCode.FINISHED

    def stop_for_preemption(self) -> ExitCode:
        self.preempted = True
        self.wait_for_async_save()
        if self.saved_step != self.step and self.step > 0:  # step 0 is the seed's to redo
            self.save("preempt")
        waited = self.stop.seconds_since_first_request()
        self.logger.event("preempted", step=self.step, reason=self.stop.reason or "peer rank",
                          seconds_signal_to_commit=None if waited is None else round(waited, 3))
        self._write_status("preempted", reason=self.stop.reason or "peer rank")
        return ExitCode.PREEMPTED

    def _write_status(self, state: str, **fields: Any) -> None:
        if self.info.is_main:
            write_status(self.cfg.run.dir, state, step=self.step,
                         total_steps=self.total_steps, **fields)

    def close(self) -> None:
        for watcher in (self.notice_watcher, self.launcher_watch):
            if watcher is not None:
                watcher.stop()
        self.ckpt.close()
        if not (self.preempted or self.stop.requested):
            self.stop.restore()  # else a second signal during teardown must not kill us
        self.samples.close()
        self.logger.close()

    # -- data ------------------------------------------------------------------------------
    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch if step else 0

    def _epoch_batches(self) -> Iterator[tuple[list, float]]:
        """Groups of grad_accum micro-batches for the rest of the current epoch, with the
        seconds spent waiting for each group."""
        epoch = self.step // self.steps_per_epoch
        start = (self.step - epoch * self.steps_per_epoch) * self.cfg.train.global_batch_size
        sampler = ResumableSampler(len(self.data.train), self.cfg.train.global_batch_size,
                                   self.info.rank, self.info.world_size, self.cfg.run.seed,
                                   epoch, start)
        loader = make_loader(self.data.train, sampler, self.micro_batch,
                             self.cfg.data.num_workers, self.device.type == "cuda",
                             self.cfg.preempt.signals)
        batches = iter(loader)
        while True:
            waited_from = time.perf_counter()
            group = [batch for _, batch in zip(range(self.cfg.train.grad_accum_steps),
                                               batches)]
            if len(group) < self.cfg.train.grad_accum_steps:
                return
            yield group, time.perf_counter() - waited_from

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self, micro_batches: list, data_wait: float) -> None:
        if self.first_step_pending:  # time to first step, for benchmarks and reports
            self.first_step_pending = False
            self.logger.event("first_step", step=self.step + 1,
                              since_process_start_s=round(seconds_since_process_start(), 3))
        started = time.perf_counter()
        self.ddp.train()
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=self.device)
        for i, (images, labels, indices) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last = i == len(micro_batches) - 1
            with (nullcontext() if last else self.ddp.no_sync()), self._autocast():
                loss = self.criterion(self.ddp(images), labels)
            self.scaler.scale(loss / len(micro_batches)).backward()
            loss_sum += loss.detach().float()
        self._optimizer_step()
        self.step += 1

        if self.samples.enabled:
            indices = torch.cat([batch[2] for batch in micro_batches]).tolist()
            self.samples.record(self.step, self.epoch_of(self.step), indices)
        self.logger.advance()
        self._track_throughput(data_wait, time.perf_counter() - started)
        if self.step % self.cfg.log.every_steps == 0 or self.step == self.total_steps:
            self._log_step(loss_sum.item() / len(micro_batches), lr)

    def _autocast(self):
        precision = self.cfg.train.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _optimizer_step(self) -> None:
        self.ckpt.wait_for_staging()  # an async save may still be copying the weights
        if self.cfg.train.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _track_throughput(self, data_wait: float, compute: float) -> None:
        window = getattr(self, "_window", None) or {"wait": 0.0, "busy": 0.0, "steps": 0}
        window["wait"] += data_wait
        window["busy"] += data_wait + compute
        window["steps"] += 1
        self._window = window

    def _log_step(self, local_loss: float, lr: float) -> None:
        window = self._window
        loss = dist.mean_over_ranks([local_loss])[0]
        images = window["steps"] * self.cfg.train.global_batch_size
        self.logger.train_step(step=self.step, epoch=self.epoch_of(self.step), loss=loss,
                               lr=lr, images_per_s=images / max(window["busy"], 1e-9),
                               data_wait=window["wait"] / max(window["busy"], 1e-9))
        self._window = None

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> None:
        """Loss, top-1 and top-5 over the validation split; each sample counted once."""
        self.state.sync_buffers()
        self.module.eval()
        sampler = ShardSampler(len(self.data.val), self.info.rank, self.info.world_size)
        loader = make_loader(self.data.val, sampler, max(self.micro_batch, 64),
                             self.cfg.data.num_workers, self.device.type == "cuda",
                             self.cfg.preempt.signals)
        k = min(5, self.data.num_classes)
        totals = torch.zeros(4, dtype=torch.float64)
        for images, labels, _ in loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with self._autocast():
                logits = self.module(images).float()
            top = logits.topk(k, dim=1).indices
            totals += torch.tensor([
                nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
                (top[:, 0] == labels).sum().item(),
                (top == labels[:, None]).any(dim=1).sum().item(), len(labels)],
                dtype=torch.float64)
        loss, top1, top5, count = dist.sum_over_ranks(totals.tolist())
        self.module.train()
        self.evaluated_step = self.step
        self.logger.eval_result(step=self.step, epoch=self.epoch_of(self.step),
                                loss=loss / count, top1=top1 / count, top5=top5 / count,
                                samples=int(count))

    # -- checkpoints -----------------------------------------------------------------------
    def maybe_save(self, epoch_end: bool) -> None:
        self.ckpt.poll()  # commit a finished async save
        every = self.cfg.ckpt.every_steps
        if self.step >= self.total_steps:
            return  # finish() writes the final checkpoint
        if epoch_end and self.cfg.ckpt.at_epoch_end:
            self.save("epoch")
        elif every and self.step % every == 0:
            self.save("interval")

    def save(self, reason: str) -> None:
        """Checkpoint now. Interval and epoch saves are async when ckpt.async_mode is on;
        final and preemption saves are synchronous (and wait for an async one first)."""
        self.state.sync_buffers()
        progress = dict(step=self.step, epoch=self.step // self.steps_per_epoch,
                        samples_seen=self.step * self.cfg.train.global_batch_size,
                        global_batch_size=self.cfg.train.global_batch_size, reason=reason)
        if (self.ckpt.async_saver is not None and reason in ("interval", "epoch")
                and self.ckpt.async_usable(self.step)):
            # An async save counts as saved once committed (see wait_for_async_save).
            self.ckpt.save_async(self.state.async_builder(self.step), **progress)
            return
        try:
            self.ckpt.save(self.state.full(self.step), **progress)
        except CheckpointError as exc:
            fatal = reason in ("final", "preempt") or self.cfg.ckpt.on_save_error == "stop"
            outcome = "the run stops" if fatal else ("training continues (ckpt.on_save_"
                                                     "error=continue); earlier checkpoints "
                                                     "are untouched")
            self.logger.event("checkpoint_failed", level=logging.ERROR, step=self.step,
                              reason=reason, message=f"{exc}; {outcome}")
            if fatal:
                raise
            return
        self.saved_step = self.step

    def wait_for_async_save(self) -> None:
        """Let the async save in flight (if any) finish and commit (collective)."""
        committed = self.ckpt.wait()
        if committed is not None:
            self.saved_step = committed

    def resume(self) -> None:
        found = self.ckpt.load_latest(self._state_to_load)
        if found is None:
            self.logger.event("fresh_start", checkpoints=self.storage.describe())
            return
        manifest, state = found
        self.step, schedule_changes = self.state.restore(state)
        self._warn_if_schedule_differs(schedule_changes)
        if self.step != manifest.step:
            raise CheckpointError(f"checkpoint step-{manifest.step:08d} holds progress step "
                                  f"{self.step}; it is inconsistent, move it away")
        self.saved_step = self.step
        # Epoch-end evaluations run before that step's save; a mid-epoch stop still owes
        # the final evaluation if it is the last step.
        if self.step % self.steps_per_epoch == 0:
            self.evaluated_step = self.step
        self.logger.event("resumed", step=self.step, samples_seen=manifest.samples_seen,
                          reason=manifest.reason, saved_world_size=manifest.world_size)

    def _warn_if_schedule_differs(self, changed: dict[str, tuple[Any, Any]]) -> None:
        """The LR schedule resumes as saved (exactness); say so when the config differs."""
        if changed:
            details = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}"
                                for k, (a, b) in changed.items())
            self.logger.event("schedule_from_checkpoint", level=logging.WARNING,
                              message="the LR schedule continues as saved in the "
                                      f"checkpoint, not as configured ({details}); "
                                      "start a new --ckpt.dir to change it")

    def _state_to_load(self, manifest: Manifest) -> dict[str, Any]:
        same_world = manifest.world_size == self.info.world_size
        if not same_world:
            self.logger.event("rng_not_restored", level=logging.WARNING,
                              message=f"checkpoint was written by {manifest.world_size} "
                                      f"ranks, this run has {self.info.world_size}: data "
                                      "order is exact, dropout randomness restarts")
        return self.state.full(self.step, include_rng=same_world)
