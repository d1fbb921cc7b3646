"""Checkpoint files: where a run keeps them, and which one a resume may trust.

A run's checkpoints live in ``<default_root_dir>/checkpoints``. ``--ckpt_path last`` resolves to the newest
checkpoint there that loads with ``torch.load(weights_only=True)`` and whose replay-buffer file is present; a
truncated or corrupt one is reported by name and skipped, so a resume never silently starts from scratch because of
one bad file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_SUFFIX = ".ckpt"
STATE_KEY = "lit_td3"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def checkpoint_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "checkpoints"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint the way a resume will (weights only) or raises ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(err).__name__}: {err})") from None
    if STATE_KEY not in checkpoint:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by lit_td3 (no {STATE_KEY!r} state)")
    return checkpoint


def buffer_files_of(checkpoint: dict[str, Any], path: Path) -> list[Path]:
    """The replay-buffer files a checkpoint refers to (one per rank), resolved beside the checkpoint."""
    names = checkpoint[STATE_KEY].get("buffer_files", [])
    return [path.parent / name for name in names]


def verify(path: str | os.PathLike) -> Path:
    path = Path(path)
    checkpoint = read_checkpoint(path)
    missing = [str(f) for f in buffer_files_of(checkpoint, path) if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} refers to replay-buffer file(s) that are gone: {missing}")
    return path


def resolve_checkpoint(ckpt_path: str, directory: str | os.PathLike) -> str | None:
    """An explicit path must be good; ``last`` means the newest good checkpoint of ``directory`` (or none yet)."""
    if ckpt_path != "last":
        return str(verify(ckpt_path))
    candidates = sorted(Path(directory).glob(f"*{CHECKPOINT_SUFFIX}"), key=_newest_first)
    for candidate in candidates:
        try:
            return str(verify(candidate))
        except CheckpointError as err:
            print(f"lit_td3: skipping {err}", file=sys.stderr)
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {str(directory)!r}: every one of {len(candidates)} is damaged")
    print(f"lit_td3: no checkpoint in {str(directory)!r} yet: starting a new run", file=sys.stderr)
    return None


def _newest_first(path: Path) -> tuple[int, float]:
    # last.ckpt links to the newest step checkpoint: try it first, then the others newest first.
    return (0 if path.name == f"last{CHECKPOINT_SUFFIX}" else 1, -path.lstat().st_mtime)
