"""Classifier construction: any torchvision classification model by name, or a small CNN."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

BUILTIN_CNN = "cnn"


class ModelError(ValueError):
    """Unknown model name or unusable model settings."""


class SmallCNN(nn.Module):
    """Three conv/BatchNorm blocks, global pooling, dropout and a linear head.

    Sized for small images (8x8 digits to 32x32); BatchNorm and dropout on purpose, so
    that exact resume is exercised on buffers and on the dropout RNG.
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 32,
                 dropout: float = 0.1):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def available_models() -> list[str]:
    """Every accepted ``model.name``: the built-in CNN and torchvision's classifiers."""
    return [BUILTIN_CNN] + sorted(models.list_models(module=models))


def input_channels(name: str) -> int | None:
    """Channels a model needs (torchvision classifiers take RGB); None: any."""
    return None if name == BUILTIN_CNN else 3


def check_model_name(name: str) -> None:
    if name not in available_models():
        raise ModelError(f"model.name={name!r} is not a known model; choose one of: "
                         f"{', '.join(available_models())}")


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised classifier (no pretrained weights are ever downloaded)."""
    check_model_name(name)
    if name == BUILTIN_CNN:
        return SmallCNN(num_classes, in_channels)
    return models.get_model(name, weights=None, num_classes=num_classes)
