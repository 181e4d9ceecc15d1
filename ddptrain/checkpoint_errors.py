"""The errors of the checkpoint layer, and how a failed save's error is worded."""

from __future__ import annotations

from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message says what and where."""


class RunIdentityMismatch(CheckpointError):
    """The checkpoint directory belongs to a different run."""


class SaveError(CheckpointError):
    """A save or its commit failed on some rank; nothing was committed."""


def error_text(error: Optional[BaseException], default: str = "unknown error") -> str:
    """``type: message``, for DCP's CheckpointException one per failed rank."""
    if error is None:
        return default
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"
                         for rank, (exc, _) in sorted(error.failures.items()))[:1000]
    return f"{type(error).__name__}: {error}"[:1000]
