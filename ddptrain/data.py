"""Datasets, seeded augmentation and the resumable, deterministic distributed sampler.

Exactness rules (see DESIGN.md):
* the training order is a pure function of (seed, epoch): one permutation per epoch, cut
  into global batches of fixed size; rank r takes its contiguous slice of each one;
* the resume point is ``samples_seen``, which does not depend on the world size;
* random augmentation of sample i in epoch e draws from a generator seeded by
  (seed, e, i), so it depends on neither worker count, rank nor resume point.
The sampler yields ``(epoch, index)`` keys and the dataset derives the augmentation seed
from them.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from ddptrain import dist
from ddptrain.config import DataConfig

log = logging.getLogger(__name__)

#: Epoch value in sample keys of the validation split (no augmentation).
EVAL_EPOCH = -1
IMAGEFOLDER_DEFAULT_SIZE = 64


class DataError(ValueError):
    """Unusable data: the message names the path or key and what to do."""


@dataclass
class SplitData:
    train: "KeyedDataset"
    val: "KeyedDataset"
    num_classes: int
    channels: int
    image_size: int
    description: str


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class KeyedDataset(Dataset):
    """Dataset indexed by ``(epoch, index)`` keys with per-sample seeded augmentation.

    ``load(index)`` returns ``(uint8 image tensor CxHxW, label)``. Augmentation is applied
    inside a forked RNG so the global torch RNG (dropout) is never touched.
    """

    def __init__(self, load, labels: Sequence[int], image_size: int, channels: int,
                 augment: bool, hflip: bool, seed: int, mean: float, std: float,
                 describe=None):
        self.load = load
        self.labels = list(labels)
        self.seed = seed
        self.channels = channels
        self.describe = describe or (lambda index: f"sample {index}")
        resize = [v2.Resize((image_size, image_size), antialias=True)]
        random_ops = []
        if augment:
            random_ops.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8)))
            if hflip:
                random_ops.append(v2.RandomHorizontalFlip())
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean] * channels,
                                                                       [std] * channels)]
        self.eval_transform = v2.Compose(resize + finish)
        self.train_transform = v2.Compose(resize + random_ops + finish)
        self.has_random_ops = bool(random_ops)

    def __len__(self) -> int:
        return len(self.labels)

    def unreadable(self, indices: Sequence[int]) -> list[str]:
        """The samples among ``indices`` that cannot be read and decoded, as
        ``'<what>: <error>'`` (for data.verify_images)."""
        problems = []
        for index in indices:
            try:
                self.load(index)
            except Exception as exc:
                problems.append(f"{self.describe(index)}: {exc}")
        return problems

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image, label = self.load(index)
        except Exception as exc:  # re-raised with the file named; nothing is swallowed
            raise DataError(f"cannot read {self.describe(index)}: {exc}; replace or remove "
                            "it and rerun (training resumes from the newest complete "
                            "checkpoint)") from exc
        image = _to_channels(image, self.channels)
        if epoch == EVAL_EPOCH or not self.has_random_ops:
            return self.eval_transform(image), label, index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derive_seed(self.seed, epoch, index))
            return self.train_transform(image), label, index


def verify_readable(data: SplitData, rank: int, world_size: int) -> None:
    """Collective: every rank reads its share of both splits; DataError on every rank,
    naming the unreadable files (at most 20, and how many in all), if any is."""
    mine = [problem for split in (data.train, data.val)
            for problem in split.unreadable(range(rank, len(split), world_size))]
    problems = sorted(p for rank_problems in dist.all_gather_object(mine)
                      for p in rank_problems)
    if problems:
        shown = "; ".join(problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(f"data.verify_images: {len(problems)} unreadable sample(s): "
                        f"{shown}{more}. Replace or remove them and rerun")
    log.info("data.verify_images: all %d samples read", len(data.train) + len(data.val))


def _to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1)
    if channels == 1:
        return v2.functional.rgb_to_grayscale(image)
    raise DataError(f"cannot convert a {image.shape[0]}-channel image to {channels}")


class ResumableSampler(Sampler):
    """This rank's ``(epoch, index)`` keys for one epoch, starting at a global sample offset.

    The last partial global batch of an epoch is dropped, so every optimizer step sees
    exactly ``global_batch_size`` samples and the step count per epoch is fixed.
    """

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int,
                 seed: int, epoch: int, start_sample: int = 0):
        if global_batch_size % world_size:
            raise ValueError("global batch size must be divisible by world size")
        if start_sample % global_batch_size:
            raise ValueError("resume offset must be a multiple of the global batch size")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = epoch
        self.start_sample = start_sample

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order().tolist()
        first_step = self.start_sample // self.global_batch_size
        for step in range(first_step, self.steps_per_epoch):
            begin = step * self.global_batch_size + self.rank * self.local_batch_size
            for index in order[begin:begin + self.local_batch_size]:
                yield (self.epoch, index)

    def __len__(self) -> int:
        steps = self.steps_per_epoch - self.start_sample // self.global_batch_size
        return max(0, steps) * self.local_batch_size


class ShardSampler(Sampler):
    """Validation keys of this rank: indices rank, rank+W, ... (each sample exactly once)."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self):
        return ((EVAL_EPOCH, i) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def ignore_stop_signals(_worker_id: int,
                        names: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2")) -> None:
    """DataLoader worker init: leave stop signals (and Ctrl-C) to the main process, which
    saves first. A signal sent to a rank's whole process group then cannot kill them."""
    for name in (*names, "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def make_loader(dataset: KeyedDataset, sampler: Sampler, batch_size: int, num_workers: int,
                pin_memory: bool, stop_signals: Sequence[str] = ("SIGTERM", "SIGUSR1",
                                                                 "SIGUSR2")) -> DataLoader:
    # An explicit generator keeps DataLoader from drawing its base seed from the global
    # torch RNG, which would shift dropout randomness between a resumed and a full run.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=(functools.partial(ignore_stop_signals,
                                                        names=tuple(stop_signals))
                                      if num_workers else None),
                      generator=torch.Generator().manual_seed(0),
                      persistent_workers=False, drop_last=False)


def build_datasets(cfg: DataConfig, seed: int, channels: int | None) -> SplitData:
    """Train/val datasets for the configured source. ``channels`` forces a channel count
    (torchvision models need 3); ``None`` keeps the data's own."""
    kind = resolve_kind(cfg)
    if kind == "digits":
        return _digits(cfg, seed, channels)
    if kind == "cifar10":
        return _cifar10(cfg, seed, channels)
    return _imagefolder(cfg, seed, channels)


def resolve_kind(cfg: DataConfig) -> str:
    if cfg.dataset != "auto":
        return cfg.dataset
    if cfg.root is None:
        return "digits"
    if os.path.isdir(os.path.join(cfg.root, "cifar-10-batches-py")):
        return "cifar10"
    return "imagefolder"


def _split(num_samples: int, fraction: float, split_seed: int) -> tuple[list, list]:
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(split_seed))
    num_val = max(1, int(round(num_samples * fraction)))
    return sorted(order[num_val:].tolist()), sorted(order[:num_val].tolist())


def _keyed(cfg, images_or_loader, labels, size, channels, augment, seed, mean, std,
           describe=None) -> KeyedDataset:
    return KeyedDataset(images_or_loader, labels, size, channels, augment, cfg.hflip, seed,
                        mean, std, describe)


def _digits(cfg: DataConfig, seed: int, channels: int | None) -> SplitData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8))
    images = images.unsqueeze(1)  # N x 1 x 8 x 8
    labels = bunch.target.tolist()
    train_ids, val_ids = _split(len(labels), cfg.val_fraction, cfg.split_seed)
    size = cfg.image_size or 8
    channels = channels or 1

    def subset(ids, augment):
        return _keyed(cfg, lambda i: (images[ids[i]], labels[ids[i]]),
                      [labels[i] for i in ids], size, channels, augment, seed, 0.3, 0.4,
                      lambda i: f"digits sample {ids[i]}")

    return SplitData(subset(train_ids, cfg.augment), subset(val_ids, False), 10, channels,
                     size, f"digits ({len(train_ids)} train / {len(val_ids)} val, 8x8)")


def _cifar10(cfg: DataConfig, seed: int, channels: int | None) -> SplitData:
    def load(train: bool):
        try:
            return datasets.CIFAR10(cfg.root, train=train, download=False)
        except RuntimeError as exc:
            raise DataError(f"data.root={cfg.root!r}: no usable CIFAR-10 copy ({exc}); "
                            "place torchvision's cifar-10-batches-py folder there "
                            "(downloads are never attempted)") from exc

    train, val = load(True), load(False)
    size = cfg.image_size or 32
    channels = channels or 3

    def subset(ds, augment):
        data = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # N x 3 x 32 x 32 uint8
        return _keyed(cfg, lambda i: (data[i], ds.targets[i]), ds.targets, size, channels,
                      augment, seed, 0.47, 0.25)

    return SplitData(subset(train, cfg.augment), subset(val, False), 10, channels, size,
                     f"CIFAR-10 at {cfg.root} ({len(train)} train / {len(val)} val)")


def _imagefolder(cfg: DataConfig, seed: int, channels: int | None) -> SplitData:
    root = cfg.root
    if not os.path.isdir(root):
        raise DataError(f"data.root={root!r} does not exist or is not a directory; "
                        "point it at an ImageFolder tree (class folders, or train/ and val/)")
    has_splits = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
    if has_splits:
        train = _scan_folder(os.path.join(root, "train"))
        val = _scan_folder(os.path.join(root, "val"))
        if val.classes != train.classes:
            raise DataError(f"data.root={root!r}: val/ classes {val.classes} differ from "
                            f"train/ classes {train.classes}")
        train_items, val_items = train.samples, val.samples
    else:
        tree = _scan_folder(root)
        train_ids, val_ids = _split(len(tree.samples), cfg.val_fraction, cfg.split_seed)
        train_items = [tree.samples[i] for i in train_ids]
        val_items = [tree.samples[i] for i in val_ids]
        train = tree
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    channels = channels or 3

    def subset(items, augment):
        def load(i):
            path, label = items[i]
            return _read_image(path, channels), label
        return _keyed(cfg, load, [label for _, label in items], size, channels, augment,
                      seed, 0.45, 0.25, lambda i: f"image file {items[i][0]!r}")

    return SplitData(subset(train_items, cfg.augment), subset(val_items, False),
                     len(train.classes), channels, size,
                     f"ImageFolder {root} ({len(train_items)} train / {len(val_items)} val, "
                     f"{len(train.classes)} classes)")


def _scan_folder(path: str) -> datasets.ImageFolder:
    if not os.path.isdir(path):
        raise DataError(f"data.root: {path!r} does not exist or is not a directory")
    class_dirs = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not class_dirs:
        raise DataError(f"data.root: {path!r} has no class folders; an ImageFolder tree "
                        "needs one folder of images per class")
    extensions = datasets.folder.IMG_EXTENSIONS
    empty = [name for name in class_dirs
             if not any(f.lower().endswith(extensions)
                        for _, _, files in os.walk(os.path.join(path, name)) for f in files)]
    if empty:
        raise DataError(f"data.root: class folder(s) with no images under {path!r}: "
                        f"{', '.join(empty)}; add images ({', '.join(extensions)}) or remove "
                        "the folder(s)")
    return datasets.ImageFolder(path, loader=lambda p: p)


def _read_image(path: str, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        return v2.functional.pil_to_tensor(img)
