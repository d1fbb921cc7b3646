"""Per-update flags counted on the device and read at log points: the non-finite guard and the Q-bound alert.

Reading a flag on the host after every update would make the CPU wait for the GPU to finish it (and cannot be part
of a CUDA graph, ``lit_td3.graphs``). So each update records its flag in one small device tensor, and the module
reads all of them in one transfer at its log points: how many updates raised the flag since the last read, the env
step and value of the first of them, and the run of consecutive flagged updates (the non-finite stop rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

_COUNT, _STREAK, _LONGEST, _FIRST_STEP, _FIRST_VALUE = range(5)
_EMPTY = (0.0, 0.0, 0.0, -1.0, 0.0)


@dataclass(frozen=True)
class EventWindow:
    """What one ``DeviceEvents`` saw between two reads."""

    count: int = 0
    """Updates that raised the flag."""
    streak: int = 0
    """Consecutive flagged updates up to the newest one (0 if the newest was not flagged); runs across reads."""
    longest: int = 0
    """The longest such run that was ongoing during the window."""
    first_step: int = -1
    """Env step of the first flagged update of the window (-1: none)."""
    first_value: float = 0.0
    """The value recorded with that update."""


class DeviceEvents:
    """A flag per update, counted where the update runs; state is one float64 tensor updated in place."""

    def __init__(self) -> None:
        self.state: Tensor | None = None

    def on(self, device: torch.device) -> Tensor:
        """The state on ``device`` (made there, or moved there with its counts), for ``record_event``."""
        if self.state is None:
            self.state = torch.tensor(_EMPTY, dtype=torch.float64, device=device)
        elif self.state.device != device:
            self.state = self.state.to(device)
        return self.state


def record_event(state: Tensor, flag: Tensor, value: Tensor, step: Tensor) -> None:
    """One update into a ``DeviceEvents`` state: ``flag`` (0-d, true or 1.0 if raised) with a ``value`` and the env
    ``step`` (0-d tensors). In place, in tensor operations only: it runs inside CUDA graphs and ``torch.compile``."""
    f = (flag != 0).to(state.dtype)
    streak = (state[_STREAK] + 1.0) * f
    first = (f > 0) & (state[_COUNT] == 0)
    state.copy_(torch.stack([
        state[_COUNT] + f,
        streak,
        torch.maximum(state[_LONGEST], streak),
        torch.where(first, step.to(state.dtype), state[_FIRST_STEP]),
        torch.where(first, value.to(state.dtype), state[_FIRST_VALUE]),
    ]))


def read_events(events: Mapping[str, DeviceEvents]) -> dict[str, EventWindow]:
    """Every window since the last read, in one device-to-host transfer; the windows start afresh (streaks go on)."""
    live = {name: e.state for name, e in events.items() if e.state is not None}
    windows = {name: EventWindow() for name in events}
    if not live:
        return windows
    values = torch.stack(list(live.values())).cpu().tolist()
    for (name, state), v in zip(live.items(), values):
        windows[name] = EventWindow(int(v[_COUNT]), int(v[_STREAK]), int(v[_LONGEST]), int(v[_FIRST_STEP]),
                                    v[_FIRST_VALUE])
        # In place: a captured CUDA graph keeps writing to this tensor.
        state.copy_(torch.tensor([0.0, v[_STREAK], v[_STREAK], -1.0, 0.0], dtype=state.dtype))
    return windows
