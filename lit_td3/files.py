"""Atomic file writes: a temp file beside the target, fsync, rename; what checkpoints and replay buffers share.

Kept free of Lightning imports: the replay buffer uses it, and a buffer-only process should not pay for Lightning.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


class CheckpointWriteError(RuntimeError):
    """A checkpoint or replay-buffer file could not be written (disk full, permissions); the message names it."""


# ---------------------------------------------------------------------------------------------------- writing
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(file)`` on a temp file beside ``path``, fsyncs it and renames it over ``path``.

    A kill at any moment leaves ``path`` as it was or complete; a failed write (an ``OSError``: disk full, ...) removes
    the temp file and raises ``CheckpointWriteError`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as err:
        raise CheckpointWriteError(f"could not write {str(path)!r}: {err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise CheckpointWriteError(f"could not write {str(path)!r}: {err}; the previous file is intact") from err
        raise
    _fsync_dir(path.parent)


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Points ``link`` at ``target`` (relative to the link's folder) by renaming a new link over it: no moment
    without a ``link``."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}{TEMP_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointWriteError(f"could not point {str(link)!r} at {str(target)!r}: {err}") from err
    _fsync_dir(link.parent)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Deletes the temp files that writes killed midway left in ``directory``; returns them."""
    stale = [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file() or p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems do not allow opening a folder, which is then best effort.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------- reading
