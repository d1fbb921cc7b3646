"""Scalars against env steps: the x-axis of every lit_td3 curve is the env-step count, not Lightning's step.

``self.log`` would put Lightning's ``global_step`` on the x-axis, and under manual optimization with two optimizers
that counts optimizer steps (LIGHTNING_NOTES 1). Writing to the loggers directly also keeps logging out of the hot
path: callers decide when a log point is due and hand over plain floats.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor


def log_scalars(trainer: pl.Trainer | None, metrics: Mapping[str, float], step: int) -> None:
    """Writes ``metrics`` to every logger of ``trainer`` at ``step`` (rank zero only) and keeps the latest values in
    the module's ``latest_metrics`` for the progress display."""
    if trainer is None or not metrics:
        return
    trainer.lightning_module.latest_metrics.update(metrics)
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


class WindowMeans:
    """Sums of device tensors between log points, so that no value leaves the GPU until a log point is due."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Tensor]) -> None:
        new = [key for key in values if key not in self.sums]
        for key in new:
            self.sums[key] = values[key].detach().float().clone()
        seen = [key for key in values if key not in new]
        if seen:  # one foreach kernel, not one launch per metric
            torch._foreach_add_([self.sums[k] for k in seen], [values[k].detach().float() for k in seen])
        for key in values:
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        """Means since the last flush, read from the device in one transfer."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).cpu().tolist()
        out = {k: v / self.counts[k] for k, v in zip(keys, values)}
        self.sums, self.counts = {}, {}
        return out
