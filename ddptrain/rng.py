"""Capture and restore every RNG a training step can draw from, as plain tensors.

States are stored as tensors (not pickled objects) so they travel through DCP like any
other tensor, each rank's under its own key.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Callable, TypeVar

import numpy as np
import torch


F = TypeVar("F", bound=Callable)


def keeps_python_random(function: F) -> F:
    """Restore Python's global ``random`` state after ``function``.

    Storage libraries draw from it (botocore's retry jitter), so without this a retried
    request during a save would change the training's random stream. TODO: a save
    running in a background thread (async checkpointing) draws from the same generator
    while training runs; that needs botocore's jitter moved to a private ``Random``.
    """
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        state = random.getstate()
        try:
            return function(*args, **kwargs)
        finally:
            random.setstate(state)
    return wrapper  # type: ignore[return-value]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture(device: torch.device) -> dict[str, torch.Tensor]:
    version, internal, gauss_next = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python_state": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor(math.nan if gauss_next is None else gauss_next,
                                     dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_misc": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_cached, dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`capture` returned; raises if a part is missing or malformed."""
    python_state = state["python_state"].tolist()
    gauss = state["python_gauss"].item()
    random.setstate((python_state[0], tuple(python_state[1:]),
                     None if math.isnan(gauss) else gauss))
    pos, has_gauss = state["numpy_misc"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, state["numpy_gauss"].item()))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda":
        if "cuda" not in state:
            raise KeyError("checkpoint has no CUDA RNG state for this CUDA run")
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
