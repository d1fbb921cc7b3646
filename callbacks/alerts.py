"""Gradient explosion alerts: the signal the original report was missing until the actor loss reached -7.6M.

Every update's pre-clip gradient norms (per network part: actor_cnn, actor_mlp, critic_cnn, critic_mlp) are
compared on the device with two thresholds (a few kernels per network and update, read at log points only).
Running counts of (update, part) pairs above each threshold are logged at the module's log points: per network as
``alerts/actor/gradient_warning`` (the original report's explosion was the actor's: its GO/NO-GO criteria read
these) and ``alerts/critic/...``, and in total as ``alerts/gradient_warning`` and ``alerts/gradient_critical``.
The console gets one warning per threshold crossing (a part's norm going from below a threshold to above it), naming
the part, the norm and the env step.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lit_td3.config import check
from lit_td3.scalars import log_scalars

NETWORKS = ("actor", "critic")


class GradientAlertCallback(pl.Callback):
    """Counts updates whose pre-clip gradient norm exceeds ``warning_threshold`` / ``critical_threshold``."""

    def __init__(self, warning_threshold: float = 10_000.0, critical_threshold: float = 100_000.0) -> None:
        """
        Args:
            warning_threshold: Pre-clip L2 norm above which an update counts as a gradient warning.
            critical_threshold: Pre-clip L2 norm above which an update counts as critical.
        """
        check("GradientAlertCallback.warning_threshold", warning_threshold, warning_threshold > 0, "positive")
        check("GradientAlertCallback.critical_threshold", critical_threshold,
              critical_threshold >= warning_threshold, f"at least warning_threshold={warning_threshold}")
        self.levels = {"warning": warning_threshold, "critical": critical_threshold}
        self.counts = {(net, level): 0 for net in NETWORKS for level in self.levels}
        # Device state since the last log point, one small tensor per network (a few kernels per update):
        self._pending: dict[str, torch.Tensor] = {}  # network -> [levels] updates over each threshold
        self._peaks: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}  # network -> parts, max, its step
        self._thresholds: torch.Tensor | None = None
        self._above: dict[tuple[str, str], bool] = {}
        self._logged_at = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        norms = pl_module.last_gradient_norms
        step = None
        for net in NETWORKS:
            parts = [part for part in norms if part.startswith(f"{net}_")]
            if not parts:
                continue
            stacked = torch.stack([norms[part] for part in parts]).detach().float()
            if step is None:
                # torch.full, not torch.tensor: filling on the device needs no host-to-device copy, hence no sync.
                step = torch.full((), float(pl_module.counters.env_steps), device=stacked.device)
                if self._thresholds is None:
                    self._thresholds = torch.tensor(list(self.levels.values()), device=stacked.device)
            over = (stacked[:, None] > self._thresholds).sum(0)  # [levels]: this update's parts over each
            self._pending[net] = self._pending[net] + over if net in self._pending else over
            if net in self._peaks:
                _, peak, peak_step = self._peaks[net]
                larger = stacked > peak
                self._peaks[net] = parts, torch.maximum(stacked, peak), torch.where(larger, step, peak_step)
            else:
                self._peaks[net] = parts, stacked, step.expand_as(stacked)
        if pl_module._logged_at != self._logged_at:  # the module just reached a log point: read the device once
            self._logged_at = pl_module._logged_at
            self._flush(trainer, pl_module)

    def _flush(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pending = {net: counts.tolist() for net, counts in self._pending.items()}
        for net, counts in pending.items():
            for level, n in zip(self.levels, counts):
                self.counts[(net, level)] += int(n)
        self._pending.clear()
        metrics = {f"alerts/{net}/gradient_{level}": float(n) for (net, level), n in self.counts.items()}
        for level in self.levels:
            metrics[f"alerts/gradient_{level}"] = float(sum(n for (_, lv), n in self.counts.items() if lv == level))
        log_scalars(trainer, metrics, pl_module.counters.env_steps)
        for parts, peak, peak_step in self._peaks.values():
            for part, peak_value, at in zip(parts, peak.tolist(), peak_step.tolist()):
                for level, threshold in self.levels.items():
                    above = peak_value > threshold
                    if above and not self._above.get((part, level), False):
                        rank_zero_warn(
                            f"gradient {level}: {part} pre-clip gradient norm {peak_value:.4g} exceeded "
                            f"{threshold:.4g} at env step {int(at)}"
                        )
                    self._above[(part, level)] = above
        self._peaks.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {f"{net}/{level}": n for (net, level), n in self.counts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, n in state_dict["counts"].items():
            net, level = key.split("/")
            self.counts[(net, level)] = n
