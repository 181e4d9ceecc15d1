"""Typed configuration: one dataclass per component, a YAML file plus ``--a.b`` overrides.

Parsing is done by jsonargparse, which rejects unknown or mistyped keys (on the command
line and in config files) and checks types and choices. Cross-field rules that types
cannot express are checked by :func:`validate`, which reports every problem at once and
names the dotted key of each.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from ddptrain.startup_signals import EARLY_SIGNALS

set_parsing_settings(docstring_parse_attribute_docstrings=True)

#: Substrings of ``ckpt.storage_options`` keys whose values are never written or logged.
SECRET_KEY_MARKERS = ("secret", "password", "token", "key", "credential", "session")
#: Signals ``preempt.signals`` may name (catchable, and meant for "please stop").
STOP_SIGNAL_CHOICES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")


class ConfigError(ValueError):
    """Invalid configuration: the message names each offending key and the fix."""


@dataclass
class RunConfig:
    """Run: where logs go and the seed."""

    dir: str = "runs/digits"
    """Run directory (local path) for the resolved config, metrics.jsonl, events.jsonl and
    TensorBoard files."""
    seed: int = 0
    """Seed for model init, data order, augmentation and dropout."""


@dataclass
class DataConfig:
    """Data: source, split, augmentation and loading."""

    dataset: Literal["auto", "digits", "imagefolder", "cifar10"] = "auto"
    """Which dataset. auto: the embedded digits when data.root is unset, CIFAR-10 when
    data.root holds cifar-10-batches-py, else an ImageFolder tree."""
    root: Optional[str] = None
    """ImageFolder root (with train/ and val/ subfolders, or one tree that is split by
    data.val_fraction) or the folder holding a local CIFAR-10 copy. Never downloaded."""
    val_fraction: float = 0.2
    """Share of samples held out for validation when the data has no separate val split."""
    split_seed: int = 0
    """Seed of the fixed train/validation split (independent of run.seed)."""
    image_size: Optional[int] = None
    """Side length images are resized to. Default: native for digits (8) and CIFAR-10
    (32), 64 for ImageFolder."""
    augment: bool = True
    """Random crop with padding (seeded per seed, epoch and sample index)."""
    hflip: bool = False
    """Also random horizontal flips (off by default: wrong for digits)."""
    num_workers: int = 0
    """DataLoader worker processes per rank. Batches are identical for any value."""
    verify_images: bool = False
    """Before the first step, read and decode every image of both splits once (each rank
    a share) and stop with one error naming the unreadable files (the first 20, and how
    many in all). Off: a damaged file is found when a batch first reaches it (also
    mid-run; the run then stops and resumes from its newest checkpoint once the file is
    fixed). Costs one pass over the data."""


@dataclass
class ModelConfig:
    """Model: architecture."""

    name: str = "cnn"
    """'cnn' (built-in small CNN with BatchNorm) or any torchvision classification model
    name such as resnet18 or resnet50. num_classes comes from the data."""
    channels_last: bool = False
    """Use the channels_last memory format (faster convolutions on CUDA)."""


@dataclass
class OptimConfig:
    """Optimizer."""

    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer."""
    lr: float = 0.1
    """Peak learning rate (reached after sched.warmup_steps)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for AdamW)."""


@dataclass
class SchedConfig:
    """Learning-rate schedule."""

    name: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = 20
    """Optimizer steps of linear warmup from 0 to optim.lr."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a share of optim.lr."""


@dataclass
class TrainConfig:
    """Training: length, batch, precision and device."""

    epochs: int = 15
    """Number of passes over the training split."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (the LR schedule still spans all epochs)."""
    global_batch_size: int = 64
    """Samples per optimizer step summed over all ranks and accumulation steps; must be
    divisible by world size x train.grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    grad_clip_norm: Optional[float] = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision: bf16, or fp16 with a GradScaler (meant for CUDA; it also runs,
    slowly, on CPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA (device from LOCAL_RANK, NCCL) when available, else CPU with gloo."""
    eval_every_epochs: int = 1
    """Evaluate on the validation split every N epochs and after the last step."""


@dataclass
class CkptConfig:
    """Checkpoints: location, frequency, retention and storage."""

    dir: Optional[str] = None
    """Checkpoint location: a local path or an fsspec URL (s3://bucket/prefix, ...).
    Default: <run.dir>/checkpoints. Runs resume from the newest complete checkpoint here."""
    every_steps: int = 50
    """Save every N optimizer steps (0: off)."""
    at_epoch_end: bool = True
    """Also save at the end of every epoch."""
    keep_last: int = 3
    """Keep this many newest complete checkpoints (>= 1)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the checkpoint location, as JSON on the command line. For s3:
    endpoint_url, region, profile, key, secret, token, client_kwargs, config_kwargs
    (botocore: retries, timeouts), ... Unset: the standard AWS chain (environment, profile,
    instance role). Secret values are never logged or written to the run directory."""
    thread_count: Optional[int] = None
    """DCP writer threads per rank, each writing its own file. On object stores this is the
    number of parallel uploads per rank (the parts of one file go up in sequence).
    Default: 1 on local disk, 4 on object stores."""
    block_size_mb: int = 64
    """Part size in MiB of multipart uploads to s3:// (s3fs default_block_size, 5-5120):
    the size of one upload request and of the write buffer per file and thread."""
    on_save_error: Literal["continue", "stop"] = "continue"
    """When an interval or epoch-end save fails after the storage's own retries: continue
    (log it and keep training; earlier checkpoints are untouched) or stop (exit 1). A
    failed final or preemption save always fails the run."""
    plan_caching: bool = True
    """Let DCP reuse the save plan while the state's layout is unchanged: ranks skip
    sending their plans (10-35% faster sync saves of ResNet-50 measured on 2 CPU cores)."""
    async_mode: Literal["off", "thread", "process"] = "off"
    """Write interval and epoch-end checkpoints in the background: training stops only
    to snapshot BatchNorm statistics, RNG, scheduler and scaler state (milliseconds);
    parameters and optimizer state are copied to host memory during the next
    forward/backward (whose optimizer step waits for the copy) and written by a thread or
    by a helper process per rank (process: no GIL shared with training, costs a process
    started during setup and shared memory). A save is committed when every rank has
    written it; at most one is in flight: the next save, a stop and the end of training
    wait for it. Final and preemption checkpoints are always written synchronously."""
    cache_staging: bool = True
    """With ckpt.async_mode: keep the host copy's buffers between saves (one copy of the
    model+optimizer state stays in host RAM) instead of allocating them at every save."""


@dataclass
class LogConfig:
    """Logging and metrics."""

    every_steps: int = 10
    """Print a step line (and a metrics.jsonl row) every N optimizer steps."""
    progress_bar: Literal["auto", "on", "off"] = "auto"
    """tqdm progress bar on rank 0. auto: only when stderr is a terminal."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <run.dir>/tensorboard."""
    sample_ids: bool = False
    """Write the sample indices of every step to <run.dir>/samples-rank<R>.jsonl."""


@dataclass
class PreemptConfig:
    """Preemption: stop signals and cloud preemption notices."""

    # The same signals ddptrain catches from its first line (before this config exists).
    signals: list[str] = field(default_factory=lambda: list(EARLY_SIGNALS))
    """Signals that ask for a graceful stop: every rank finishes the current step, a
    complete checkpoint (reason preempt) is committed, and the run exits (status.json:
    preempted). Choose from SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP, SIGQUIT. A second
    SIGINT (Ctrl-C) interrupts at once, without the save. Under torchrun also pass
    --signals-to-handle with the same names."""
    notice: Literal["off", "aws", "gcp"] = "off"
    """Poll the cloud provider's preemption notice (on each node's local rank 0) and stop
    gracefully when one is posted. aws: spot instance-action (IMDSv2, falling back to
    IMDSv1); gcp: the instance/preempted metadata value."""
    notice_url: Optional[str] = None
    """URL of the preemption notice. Default: the provider's metadata URL
    (http://169.254.169.254/latest/meta-data/spot/instance-action for aws,
    http://metadata.google.internal/computeMetadata/v1/instance/preempted for gcp)."""
    poll_seconds: float = 5.0
    """Seconds between two polls of the preemption notice. A failed poll counts as
    "no notice"."""


@dataclass
class Config:
    """ddptrain: distributed, fault-tolerant image-classifier training."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)

    @property
    def ckpt_dir(self) -> str:
        """The checkpoint location as a string (never a Path: it may be a URL)."""
        return self.ckpt.dir or os.path.join(self.run.dir, "checkpoints")


class NamedConfigFile(ActionConfigFile):
    """``--config FILE``, whose YAML syntax errors name the file (jsonargparse's own
    message says only ``"<unicode string>", line L``)."""

    def __call__(self, parser, cfg, values, option_string=None):
        if isinstance(values, str) and os.path.isfile(values):
            import json

            import yaml

            try:
                with open(values, encoding="utf-8") as f:
                    content = yaml.safe_load(f)
                json.dumps(content)  # a self-referencing alias cannot be a config
            except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError,
                    RecursionError, TypeError) as exc:
                parser.error(f"--config {values}: not a readable YAML config file: {exc}")
            if content is None:
                return None  # an empty file sets nothing
            if not isinstance(content, dict):
                parser.error(f"--config {values}: must map sections to options (for "
                             f"example 'train:' then '  epochs: 5'), not a "
                             f"{type(content).__name__}")
        return super().__call__(parser, cfg, values, option_string)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ddptrain",
        description=(
            "Train an image classifier with DDP. Launch with torchrun (or plain python for "
            "one process). Every start resumes from the newest complete checkpoint in "
            "ckpt.dir. Options are --section.key VALUE; --config FILE.yaml sets many."
        ),
        default_env=False,
        allow_abbrev=False,  # a mistyped prefix such as --train.epoch must be an error
    )
    parser.add_argument("--config", action=NamedConfigFile, help="YAML config file.")
    parser.add_class_arguments(Config, None, as_group=True)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line (and any --config file) into a validated :class:`Config`."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    cfg = parser.instantiate(namespace)
    config = cfg if isinstance(cfg, Config) else _config_from_namespace(cfg)
    validate(config)
    return config


def _config_from_namespace(namespace: Any) -> Config:
    sections = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(Config)}
    return Config(**sections)


def validate(cfg: Config) -> None:
    """Check rules that types cannot express; raise one ConfigError listing all problems."""
    problems = []

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r}: {allowed}")

    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", cfg.data.val_fraction,
         "must be between 0 and 1")
    need(cfg.data.image_size is None or cfg.data.image_size >= 4, "data.image_size",
         cfg.data.image_size, "must be >= 4 or unset")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0")
    need(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    need(0.0 <= cfg.optim.momentum < 1.0, "optim.momentum", cfg.optim.momentum,
         "must be >= 0 and < 1")
    need(all(0.0 <= b < 1.0 for b in cfg.optim.betas), "optim.betas", cfg.optim.betas,
         "each must be >= 0 and < 1")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay,
         "must be >= 0")
    need(cfg.sched.warmup_steps >= 0, "sched.warmup_steps", cfg.sched.warmup_steps,
         "must be >= 0")
    need(0.0 <= cfg.sched.min_lr_ratio <= 1.0, "sched.min_lr_ratio", cfg.sched.min_lr_ratio,
         "must be between 0 and 1")
    need(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, "must be >= 1")
    need(cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps",
         cfg.train.max_steps, "must be >= 1 or unset")
    need(cfg.train.global_batch_size >= 1, "train.global_batch_size",
         cfg.train.global_batch_size, "must be >= 1")
    need(cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps",
         cfg.train.grad_accum_steps, "must be >= 1")
    need(0.0 <= cfg.train.label_smoothing < 1.0, "train.label_smoothing",
         cfg.train.label_smoothing, "must be in [0, 1)")
    need(cfg.train.grad_clip_norm is None or cfg.train.grad_clip_norm > 0,
         "train.grad_clip_norm", cfg.train.grad_clip_norm, "must be > 0 or unset")
    need(cfg.train.eval_every_epochs >= 1, "train.eval_every_epochs",
         cfg.train.eval_every_epochs, "must be >= 1")
    need(cfg.ckpt.every_steps >= 0, "ckpt.every_steps", cfg.ckpt.every_steps,
         "must be >= 0 (0 turns interval saves off)")
    need(cfg.ckpt.keep_last >= 1, "ckpt.keep_last", cfg.ckpt.keep_last,
         "must be >= 1 (the newest complete checkpoint is always kept)")
    need(cfg.ckpt.thread_count is None or cfg.ckpt.thread_count >= 1, "ckpt.thread_count",
         cfg.ckpt.thread_count, "must be >= 1 or unset")
    need(5 <= cfg.ckpt.block_size_mb <= 5120, "ckpt.block_size_mb", cfg.ckpt.block_size_mb,
         "must be between 5 and 5120 (S3's part size limits)")
    need(cfg.log.every_steps >= 1, "log.every_steps", cfg.log.every_steps, "must be >= 1")
    for name in cfg.preempt.signals:
        need(name in STOP_SIGNAL_CHOICES, "preempt.signals", cfg.preempt.signals,
             f"{name!r} is not one of {', '.join(STOP_SIGNAL_CHOICES)}")
    need(cfg.preempt.poll_seconds > 0, "preempt.poll_seconds", cfg.preempt.poll_seconds,
         "must be > 0")
    need(cfg.data.dataset in ("auto", "digits") or cfg.data.root is not None, "data.root",
         cfg.data.root, f"must be set for data.dataset={cfg.data.dataset}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def validate_for_world(cfg: Config, world_size: int) -> None:
    """Rules that depend on the launch (world size); raises ConfigError naming the keys."""
    per_step = world_size * cfg.train.grad_accum_steps
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"world size ({world_size}) x train.grad_accum_steps "
            f"({cfg.train.grad_accum_steps}) = {per_step}; choose a multiple of {per_step}"
        )


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Copy of storage options with secret-looking values replaced (recursively)."""
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            clean[key] = redact(value)
        elif any(marker in key.lower() for marker in SECRET_KEY_MARKERS):
            clean[key] = "***"
        else:
            clean[key] = value
    return clean


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict of the resolved config with secrets redacted (safe to write or log)."""
    data = dataclasses.asdict(cfg)
    data["ckpt"]["storage_options"] = redact(data["ckpt"]["storage_options"])
    data["ckpt"]["dir"] = cfg.ckpt_dir
    return data
