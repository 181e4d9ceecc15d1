"""Offline reading of DCP checkpoints for tests: flatten to {key: value} on one process."""

from __future__ import annotations

import os
import tempfile

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


def load_flat(checkpoint_dir: str) -> dict:
    """Every entry of a DCP checkpoint directory, flattened to dotted keys."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "state.pt")
        dcp_to_torch_save(checkpoint_dir, out)
        state = torch.load(out, weights_only=False)
    flat: dict = {}
    _flatten(state, "", flat)
    return flat


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", out)
    else:
        out[prefix.rstrip(".")] = value


def differences(a: dict, b: dict, ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values are not bitwise equal (tensors compared with torch.equal)."""
    problems = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ignore_prefixes):
            continue
        if key not in a or key not in b:
            problems.append(f"{key}: only in {'first' if key in a else 'second'}")
            continue
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and x.shape == y.shape
                    and _same_bits(x, y))
        else:
            same = x == y
        if not same:
            problems.append(key)
    return problems


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals NaN with the same bits; -0.0 differs from 0.0)."""
    flat_x = x.detach().cpu().contiguous().reshape(-1)
    flat_y = y.detach().cpu().contiguous().reshape(-1)
    return torch.equal(flat_x.view(torch.uint8), flat_y.view(torch.uint8))
