"""The on-disk checkpoint contract: directory names, the manifest (commit marker) and
what makes a checkpoint directory complete. See ddptrain.checkpoint for the manager that
writes and reads them.

A checkpoint directory ``step-<8-digit step>`` is complete when its ``manifest.json``
parses, names this step, lists ``.metadata``, and every file it lists exists with the
listed byte size. Anything else is incomplete and never loaded.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ddptrain import __version__
from ddptrain.storage import Storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
STEP_DIR_PATTERN = re.compile(r"^step-(\d{8,})$")


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> Optional[int]:
    """The step of a checkpoint directory name, or None for any other name (also for
    ``step-5`` or ``step-000000005``: only the names ddptrain writes count)."""
    match = STEP_DIR_PATTERN.match(name)
    if match is None or step_dirname(int(match.group(1))) != name:
        return None
    return int(match.group(1))


@dataclass
class Manifest:
    step: int
    epoch: int
    samples_seen: int
    world_size: int
    global_batch_size: int
    identity: dict[str, Any]
    reason: str
    files: dict[str, int]
    format_version: int = FORMAT_VERSION
    torch_version: str = torch.__version__
    ddptrain_version: str = __version__
    created_unix: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format {data.get('format_version')!r}")
        return cls(**data)


@dataclass
class CheckpointStatus:
    """What discovery found in one ``step-*`` directory."""

    name: str
    step: int
    manifest: Optional[Manifest]
    problem: str = ""
    empty: bool = False  # no files at all: nothing, not even a failed save
    #: Has a manifest.json that does not verify: it was committed once and has been
    #: damaged since (a save that never committed has no manifest).
    damaged: bool = False

    @property
    def complete(self) -> bool:
        return self.manifest is not None


def verify(storage: Storage, name: str) -> CheckpointStatus:
    """Check one directory against its manifest (existence and size of every file)."""
    step = parse_step(name)
    files = storage.file_sizes(name)
    if not files:
        return CheckpointStatus(name, step, None, "empty directory", empty=True)
    if MANIFEST_NAME not in files:
        return CheckpointStatus(name, step, None, "no manifest.json (save never committed)")
    try:
        manifest = Manifest.from_json(storage.read_text(name, MANIFEST_NAME))
    except (ValueError, TypeError, KeyError) as exc:
        return _damaged(name, step, f"unreadable manifest.json: {exc}")
    if manifest.step != step:
        return _damaged(name, step, f"manifest says step {manifest.step}")
    if ".metadata" not in manifest.files:
        return _damaged(name, step, "manifest lists no .metadata")
    for fname, size in sorted(manifest.files.items()):
        if fname not in files:
            return _damaged(name, step, f"missing file {fname}")
        if files[fname] != size:
            return _damaged(name, step, f"{fname} has {files[fname]} bytes, manifest says "
                                        f"{size}")
    return CheckpointStatus(name, step, manifest)


def _damaged(name: str, step: int, problem: str) -> CheckpointStatus:
    return CheckpointStatus(name, step, None, f"{problem} (committed, then damaged)",
                            damaged=True)


def scan(storage: Storage) -> list[CheckpointStatus]:
    """Every ``step-*`` directory, newest step first (steps compare as numbers)."""
    names = [n for n in storage.list_dirs() if parse_step(n) is not None]
    names.sort(key=parse_step, reverse=True)
    return [verify(storage, n) for n in names]


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
