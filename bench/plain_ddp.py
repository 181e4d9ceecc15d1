"""B1's reference: a hand-written DDP training loop, launched with torchrun.

Same model (torchvision, seeded like ddptrain), same data and per-sample augmentation
(ddptrain's dataset objects, read through a standard DistributedSampler), same global
batch, optimizer and loss as ``python -m ddptrain`` with the options the benchmark passes.
What it leaves out is everything ddptrain adds around the step: the resumable sampler,
the stop agreement, checkpoint bookkeeping, events, sample records.

Rank 0 appends ``{"step", "time", "loss"}`` to ``--out`` after every step (the loss is
averaged over ranks, as ddptrain's logged loss is).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import models

from ddptrain.config import DataConfig
from ddptrain.data import build_datasets


class EpochView(Dataset):
    """Plain index -> sample view of ddptrain's (epoch, index)-keyed training set."""

    def __init__(self, keyed, epoch: int = 0):
        self.keyed, self.epoch = keyed, epoch

    def __len__(self) -> int:
        return len(self.keyed)

    def __getitem__(self, index: int):
        image, label, _ = self.keyed[(self.epoch, index)]
        return image, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--global_batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON-lines file of step times")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = build_datasets(DataConfig(image_size=args.image_size), args.seed, 3)
    train_set = EpochView(data.train)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.global_batch_size // world,
                        sampler=sampler, drop_last=True)

    torch.manual_seed(args.seed)
    model = DistributedDataParallel(models.get_model(args.model, weights=None,
                                                    num_classes=data.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    # Linear warmup like ddptrain's default schedule (its cost, not its values, matters).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 20))
    criterion = nn.CrossEntropyLoss()
    out = open(args.out, "a", encoding="utf-8") if rank == 0 else None

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        train_set.epoch = epoch
        for images, labels in loader:
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if out is not None:
                out.write(json.dumps({"step": step, "time": time.time(),
                                      "loss": mean_loss.item() / world}) + "\n")
                out.flush()
            if step >= args.steps:
                break
        epoch += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
