"""Reading a run's TensorBoard event files into numpy arrays.

A run is a directory (the trainer's ``default_root_dir``) holding one or more
``events.out.tfevents.*`` files, possibly in subfolders; a resumed run adds a
file. The x-axis of every scalar is the env step. Files are read one by one
with TensorBoard's own ``EventAccumulator`` (its orphan purging off: which
write wins is decided here), then merged per tag; where the same step of a
tag was written more than once (a resumed run re-logging the steps after its
checkpoint), the later write wins.

This module only reads: it never writes to a run directory and never computes
statistics.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from lit_td3.report.errors import ReportInputError

EVENT_FILE_GLOB = "events.out.tfevents.*"
# SummaryWriter names files events.out.tfevents.<unix seconds>.<host>.<pid>.<n>.
_FILE_TIME = re.compile(r"events\.out\.tfevents\.(\d+)")


@dataclass(frozen=True)
class Series:
    """One scalar tag: env steps (ascending, unique) and the value logged at each."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class Run:
    """All scalars of one run, merged over its event files."""

    run_dir: Path
    event_files: tuple[Path, ...]
    scalars: dict[str, Series] = field(repr=False)

    @property
    def tags(self) -> list[str]:
        return sorted(self.scalars)

    def __contains__(self, tag: object) -> bool:
        return tag in self.scalars

    def __getitem__(self, tag: str) -> Series:
        return self.scalars[tag]

    @property
    def step_range(self) -> tuple[int, int]:
        """First and last env step logged by any tag."""
        firsts = [int(s.steps[0]) for s in self.scalars.values()]
        lasts = [int(s.steps[-1]) for s in self.scalars.values()]
        return min(firsts), max(lasts)


def find_event_files(run_dir: Path) -> list[Path]:
    """Event files under ``run_dir``, recursively, oldest first (time in the name)."""
    files = [p for p in run_dir.rglob(EVENT_FILE_GLOB) if p.is_file()]
    return sorted(files, key=_file_order)


def _file_order(path: Path) -> tuple[int, str]:
    match = _FILE_TIME.match(path.name)
    return (int(match.group(1)) if match else 0, str(path))


@dataclass
class _Points:
    """Raw points of one tag before merging, with what is needed to order rewrites."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)
    file_ranks: list[int] = field(default_factory=list)


def load_run(run_dir: str | Path) -> Run:
    """Load every scalar of the run at ``run_dir``.

    Raises ReportInputError when the path is not a directory, holds no event
    files, or its event files hold no scalars.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportInputError(
            f"run directory {str(path)!r} does not exist or is not a directory."
        )
    files = find_event_files(path)
    if not files:
        raise ReportInputError(
            f"run directory {str(path)!r} holds no TensorBoard event files "
            f"({EVENT_FILE_GLOB}, searched recursively); "
            "is it the trainer's default_root_dir?"
        )
    points: dict[str, _Points] = {}
    for rank, file in enumerate(files):
        for tag, event in _scalar_events(file):
            tag_points = points.setdefault(tag, _Points())
            tag_points.steps.append(event.step)
            tag_points.values.append(event.value)
            tag_points.wall_times.append(event.wall_time)
            tag_points.file_ranks.append(rank)
    if not points:
        raise ReportInputError(
            f"run directory {str(path)!r} has {len(files)} event file(s) "
            "but no scalars in them; "
            "did the run log anything before it stopped?"
        )
    scalars = {tag: _merge(tag_points) for tag, tag_points in points.items()}
    return Run(run_dir=path, event_files=tuple(files), scalars=scalars)


def _scalar_events(file: Path) -> Iterator[tuple[str, event_accumulator.ScalarEvent]]:
    # size 0 keeps every point (the default keeps a 10,000-point sample);
    # purging is off because merging across files is done here, by step.
    accumulator = event_accumulator.EventAccumulator(
        str(file),
        size_guidance={event_accumulator.SCALARS: 0},
        purge_orphaned_data=False,
    ).Reload()
    for tag in accumulator.Tags()[event_accumulator.SCALARS]:
        yield from ((tag, event) for event in accumulator.Scalars(tag))


def _merge(points: _Points) -> Series:
    """Sort by step; for a step written more than once keep the latest write."""
    steps = np.asarray(points.steps, dtype=np.int64)
    write_order = np.arange(len(steps))
    # lexsort: the last key is the primary one. Within a step, later wall time,
    # then later file, then later position in the file wins.
    keys = (
        write_order,
        np.asarray(points.file_ranks),
        np.asarray(points.wall_times),
        steps,
    )
    order = np.lexsort(keys)
    sorted_steps = steps[order]
    is_last_of_step = np.append(sorted_steps[1:] != sorted_steps[:-1], True)
    keep = order[is_last_of_step]
    return Series(
        steps=steps[keep], values=np.asarray(points.values, dtype=np.float64)[keep]
    )
