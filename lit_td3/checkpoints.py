"""Checkpoint files: how they are written, where a run keeps them, and which one a resume may trust.

A run's checkpoints live in ``<default_root_dir>/checkpoints``, each with the replay-buffer file(s) it refers to. Every
file is written atomically: a temp file in the same folder, fsync, then a rename over the target, so a kill at any
moment leaves either the old file or the new one, never a half-written one; a write that fails (disk full) names the
file and leaves the previous one as it was. ``--ckpt_path last`` resolves to the newest checkpoint there that loads
with ``torch.load(weights_only=True)`` and whose replay-buffer files are readable; a truncated or corrupt one is
reported by name and skipped, so a resume never silently starts from scratch because of one bad file.

This module never loads a checkpoint into a model and never deletes a checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_td3.files import atomic_write

CHECKPOINT_SUFFIX = ".ckpt"
STATE_KEY = "lit_td3"
BUFFER_FORMAT = "lit_td3.ReplayBuffer"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with ``atomic_write``: Lightning's own writes the temp file in the system temp
    folder and *moves* it, which is a copy, not atomic, when that folder is on another filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def checkpoint_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "checkpoints"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint the way a resume will (weights only) or raises ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - RuntimeError, EOFError, UnpicklingError...: all mean "damaged"
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, Mapping) or STATE_KEY not in checkpoint:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by lit_td3 (no {STATE_KEY!r} state)")
    return dict(checkpoint)


def buffer_files_of(checkpoint: Mapping[str, Any], path: Path) -> list[Path]:
    """The replay-buffer files a checkpoint refers to (one per rank), resolved beside the checkpoint."""
    names = checkpoint[STATE_KEY].get("buffer_files", [])
    return [path.parent / name for name in names]


def check_buffer_file(path: Path) -> None:
    """Raises ``CheckpointError`` unless ``path`` is a readable replay-buffer file.

    Reads only the file's index (memory-mapped): a truncated file fails here; the checksums of the data are checked
    when the buffer is loaded.
    """
    if not path.is_file():
        raise CheckpointError(f"replay-buffer file {str(path)!r} is gone")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - as in read_checkpoint
        raise CheckpointError(f"replay-buffer file {str(path)!r} is truncated or corrupt ({type(err).__name__}: "
                              f"{err})") from None
    if not isinstance(state, Mapping) or state.get("format") != BUFFER_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a lit_td3 replay-buffer file")


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` if it loads and its replay-buffer files are readable; else ``CheckpointError``."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    for buffer_file in buffer_files_of(checkpoint, path):
        try:
            check_buffer_file(buffer_file)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint {str(path)!r} refers to a replay buffer it cannot use: {err}") from None
    return checkpoint


def resolve_checkpoint(ckpt_path: str, directory: str | os.PathLike) -> str | None:
    """An explicit path must be good; ``last`` means the newest good checkpoint of ``directory`` (or none yet).

    Every skipped checkpoint and the one chosen are reported on stderr, so the log says where the run resumed.
    """
    if ckpt_path != "last":
        return _resuming(Path(ckpt_path), verify(ckpt_path))
    candidates = sorted(Path(directory).glob(f"*{CHECKPOINT_SUFFIX}"), key=_newest_first)
    for candidate in candidates:
        try:
            return _resuming(candidate, verify(candidate))
        except CheckpointError as err:
            print(f"lit_td3: skipping {err}", file=sys.stderr)
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {str(directory)!r}: every one of {len(candidates)} is damaged "
                              "or has lost its replay buffer (see above); pass --ckpt_path null to start a new run")
    print(f"lit_td3: no checkpoint in {str(directory)!r} yet: starting a new run", file=sys.stderr)
    return None


def _resuming(path: Path, checkpoint: Mapping[str, Any]) -> str:
    counters = checkpoint[STATE_KEY].get("counters", {})
    print(f"lit_td3: resuming from {str(path)!r} (env step {counters.get('env_steps', '?')})", file=sys.stderr)
    return str(path)


def _newest_first(path: Path) -> tuple[int, float]:
    # last.ckpt links to the newest step checkpoint: try it first, then the others newest first.
    try:
        mtime = path.lstat().st_mtime
    except FileNotFoundError:  # deleted while listing
        mtime = 0.0
    return (0 if path.name == f"last{CHECKPOINT_SUFFIX}" else 1, -mtime)
