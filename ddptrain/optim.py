"""Optimizer and learning-rate schedule (linear warmup, then cosine or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ddptrain.config import OptimConfig, SchedConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay)


class WarmupCosine:
    """LR multiplier for optimizer step ``s`` (0-based): linear warmup, then cosine decay
    from 1 to ``min_ratio`` at ``total_steps`` (or constant 1 for ``name='constant'``).

    A callable object rather than a closure so the schedule is plain data.
    """

    def __init__(self, name: str, warmup_steps: int, total_steps: int, min_ratio: float):
        self.name = name
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = WarmupCosine(cfg.name, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
