"""The arithmetic of one optimizer step's gradient telemetry and non-finite guard, as pure tensor functions.

Per step it is a few dozen operations on scalars: part norms from per-parameter norms, the total, the non-finite
flag, the clip flag, the event counts of ``lit_td3.events``. Issued one by one, each is a kernel launch, and even
replayed in a CUDA graph each costs a few microseconds, more than its arithmetic: together they were 6-10% of a
graphed update. ``StepTelemetry(fused=True)`` runs each function through ``torch.compile``, which fuses it into a
few kernels; ``fused=False`` runs the same functions eagerly (the CPU default, and what the tests compare against).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_td3.events import record_event


def step_statistics(param_norms: list[Tensor], part_sizes: list[int], loss: Tensor, max_norm: float,
                    events: Tensor | None, env_step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the per-parameter gradient norms of one step (``torch._foreach_norm``, parameters in part order): the L2
    norm of each part ([parts]), the total L2 norm, whether the step is non-finite (its loss or any gradient; 1.0 or
    0.0 in float32, as fused Adam's ``found_inf`` takes it) and whether clipping at ``max_norm`` engages (1.0 or
    0.0). The non-finite flag is recorded with the loss in ``events`` (a ``DeviceEvents`` state) unless it is None.

    The sums of squares are one masked reduction, a row per part and a last row over all parameters, so that
    compiled they are one kernel rather than one per part plus one for the total.
    """
    squares = torch.stack(param_norms).square()
    index = torch.arange(len(param_norms), device=squares.device)
    bounds = list(itertools.accumulate(part_sizes, initial=0))
    rows = [(index >= start) & (index < end) for start, end in itertools.pairwise(bounds)]
    norms = torch.where(torch.stack([*rows, index >= 0]), squares, 0.0).sum(1).sqrt()
    part_norms, total = norms[:-1], norms[-1]
    nonfinite = ~(torch.isfinite(loss) & torch.isfinite(total))
    if events is not None:
        record_event(events, nonfinite, loss, env_step)
    return part_norms, total, nonfinite.to(torch.float32), (total > max_norm).to(total.dtype)


def total_norm(param_norms: list[Tensor]) -> Tensor:
    """The L2 norm of all gradients from their per-parameter norms."""
    return torch.stack(param_norms).square().sum().sqrt()


def record_q_bound(state: Tensor, actor_loss: Tensor, limit: float, step: Tensor) -> None:
    """Records in ``state`` (``lit_td3.events``) whether the actor step's mean Q1(s, mu(s)), the negated actor
    loss, is beyond +-``limit``."""
    q = -actor_loss
    record_event(state, q.abs() > limit, q, step)


class StepTelemetry:
    """The functions above, compiled (``fused``) or eager."""

    def __init__(self, fused: bool) -> None:
        def build(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(fn, fullgraph=True, dynamic=False) if fused else fn

        self.fused = fused
        self.step_statistics = build(step_statistics)
        self.total_norm = build(total_norm)
        self.record_q_bound = build(record_q_bound)
