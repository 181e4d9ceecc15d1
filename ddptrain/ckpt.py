"""Checkpoint tools: ``python -m ddptrain.ckpt {list,verify,export} DIR``.

``list`` shows every ``step-*`` directory with its status, ``verify`` checks the newest
complete checkpoint (or a named one) against its manifest and exits non-zero if there is
none, ``export`` writes the model weights of a checkpoint to a file that loads with
``torch.load(path, weights_only=True)``, for inference.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ddptrain.checkpoint import error_text, parse_step, scan, verify as verify_dir
from ddptrain.storage import Storage


def _open(ckpt_dir: str, name: Optional[str], storage_options: Optional[dict[str, Any]]
          ) -> tuple[Storage, Optional[str]]:
    """The checkpoint location and step name; CKPT_DIR may also be a step-* directory."""
    base, _, last = ckpt_dir.rstrip("/").rpartition("/")
    if name is None and parse_step(last) is not None and base:
        ckpt_dir, name = base, last
    storage = Storage(ckpt_dir, storage_options)
    if not storage.exists():
        raise SystemExit(f"{storage.describe()}: no such checkpoint location")
    return storage, name


def list_checkpoints(ckpt_dir: str, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Print every step-* directory in CKPT_DIR, newest first, with its status.

    Args:
        ckpt_dir: Checkpoint location (local path or fsspec URL).
        storage_options: fsspec options, as for ckpt.storage_options.
    """
    storage, _ = _open(ckpt_dir, None, storage_options)
    for status in scan(storage):
        if status.complete:
            m = status.manifest
            print(f"{status.name}  complete  step={m.step} epoch={m.epoch} "
                  f"reason={m.reason} world_size={m.world_size} "
                  f"bytes={sum(m.files.values())}")
        else:
            print(f"{status.name}  INCOMPLETE  {status.problem}")


def verify(ckpt_dir: str, name: Optional[str] = None,
           storage_options: Optional[dict[str, Any]] = None) -> None:
    """Check a checkpoint against its manifest (default: the newest complete one).

    Checks that every file the manifest names exists with its size (a size check: a
    same-size corruption is only found when loading). Exits with status 1 when the
    checkpoint is incomplete or there is no complete checkpoint.

    Args:
        ckpt_dir: Checkpoint location (local path or fsspec URL), or a step-* directory.
        name: A step directory name such as step-00000120.
        storage_options: fsspec options, as for ckpt.storage_options.
    """
    storage, name = _open(ckpt_dir, name, storage_options)
    status = verify_dir(storage, name) if name else next(
        (s for s in scan(storage) if s.complete), None)
    if status is None or not status.complete:
        problem = status.problem if status else "no complete checkpoint"
        print(f"{storage.describe(name or '')}: {problem}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"name": status.name, "step": status.manifest.step,
                      "identity": status.manifest.identity}, indent=2))


def export(ckpt_dir: str, out: str, name: Optional[str] = None,
           storage_options: Optional[dict[str, Any]] = None) -> None:
    """Write a checkpoint's model weights (a plain state dict) to OUT for inference.

    Args:
        ckpt_dir: Checkpoint location (local path or fsspec URL), or a step-* directory.
        out: Output file; load it with torch.load(out, weights_only=True).
        name: A step directory name (default: the newest complete checkpoint).
        storage_options: fsspec options, as for ckpt.storage_options.
    """
    out_dir = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(out_dir):
        raise SystemExit(f"{out}: OUT must be a file path in an existing directory")
    storage, name = _open(ckpt_dir, name, storage_options)
    status = verify_dir(storage, name) if name else next(
        (s for s in scan(storage) if s.complete), None)
    if status is None or not status.complete:
        raise SystemExit(f"{storage.describe(name or '')}: no complete checkpoint to export")
    try:
        weights = _read_model_weights(storage, status.name)
    # A same-size damaged file passes the manifest's size check; unpickling its garbage
    # ends in anything from UnpicklingError to MemoryError. DCP's CheckpointException
    # is a BaseException.
    except (Exception, dcp.api.CheckpointException) as exc:
        raise SystemExit(f"{storage.describe(status.name)}: could not be read, it may be "
                         f"damaged ({error_text(exc)}); export another step with "
                         "--name") from None
    torch.save({key[len("model."):]: value for key, value in weights.items()}, out)
    print(f"wrote {len(weights)} tensors of {storage.describe(status.name)} to {out}")


def _read_model_weights(storage: Storage, name: str) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors of checkpoint ``name``, read in this one process."""
    metadata = storage.dcp_reader(name).read_metadata()
    weights = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # single-process load is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(weights, storage_reader=storage.dcp_reader(name), no_dist=True)
    return weights


def main() -> None:
    from jsonargparse import CLI

    CLI({"list": list_checkpoints, "verify": verify, "export": export}, as_positional=True,
        prog="python -m ddptrain.ckpt", env_prefix=None)


if __name__ == "__main__":
    main()
