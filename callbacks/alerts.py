"""Gradient explosion alerts: the signal the original report was missing until the actor loss reached -7.6M.

Every update's pre-clip gradient norms (per network part: actor_cnn, actor_mlp, critic_cnn, critic_mlp) are kept
on the device (one copy per network and update) and compared with two thresholds in blocks: at the module's log
points, and every ``FOLD_EVERY`` updates in between so that memory stays bounded. Running counts of (update, part)
pairs above each threshold are logged at the log points: per network as ``alerts/actor/gradient_warning`` (the
original report's explosion was the actor's: its GO/NO-GO criteria read these) and ``alerts/critic/...``, and in
total as ``alerts/gradient_warning`` and ``alerts/gradient_critical``. The console gets one warning per threshold
crossing (a part's norm going from below a threshold to above it), naming the part, the norm and the env step.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lit_td3.config import check
from lit_td3.scalars import log_scalars

NETWORKS = ("actor", "critic")
FOLD_EVERY = 1024
"""Updates whose norms are kept as separate rows before they are folded into the counts and peaks."""


class _Window:
    """One network's pre-clip part norms since the last log point: rows not yet folded, and on the device the counts
    over each threshold and each part's peak with the row it came from; the env step of every row on the host."""

    def __init__(self, parts: list[str], thresholds: torch.Tensor) -> None:
        self.parts, self.thresholds = parts, thresholds
        self.rows: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.over: torch.Tensor | None = None  # [parts, levels]
        self.peak: torch.Tensor | None = None  # [parts]
        self.peak_row: torch.Tensor | None = None  # [parts], an index into steps

    def fold(self) -> None:
        if not self.rows:
            return
        block = torch.stack(self.rows).float()  # [rows, parts]
        over = (block[:, :, None] > self.thresholds).sum(0)
        peak, row = block.max(0)
        row = row + (len(self.steps) - len(self.rows))
        if self.peak is None:
            self.over, self.peak, self.peak_row = over, peak, row
        else:
            self.over = self.over + over
            self.peak_row = torch.where(peak > self.peak, row, self.peak_row)
            self.peak = torch.maximum(peak, self.peak)
        self.rows = []


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
        self._windows: dict[str, _Window] = {}
        self._thresholds: torch.Tensor | None = None
        self._above: dict[tuple[str, str], bool] = {}
        self._logged_at = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._logged_at = pl_module._logged_at  # flush at the module's next log point, not at the first batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        norms = pl_module.last_gradient_norms
        for net in NETWORKS:
            parts = [part for part in norms if part.startswith(f"{net}_")]
            if not parts:
                continue
            # One kernel, and a copy: a CUDA-graph replay overwrites the module's norms with the next update's.
            row = torch.stack([norms[part] for part in parts]).detach()
            if net not in self._windows:
                self._windows[net] = _Window(parts, self._thresholds_on(row.device))
            window = self._windows[net]
            window.rows.append(row)
            window.steps.append(pl_module.counters.env_steps)
            if len(window.rows) >= FOLD_EVERY:
                window.fold()
        if pl_module._logged_at != self._logged_at:  # the module just reached a log point: read the device once
            self._logged_at = pl_module._logged_at
            self._flush(trainer, pl_module)

    def _thresholds_on(self, device: torch.device) -> torch.Tensor:
        """The thresholds as a device tensor, made once: a new window after each log point must not copy them to
        the device again."""
        if self._thresholds is None or self._thresholds.device != device:
            self._thresholds = torch.tensor(list(self.levels.values()), device=device)
        return self._thresholds

    def _flush(self, trainer: pl.Trainer, pl_module: Any) -> None:
        peaks = []
        for net, window in self._windows.items():
            window.fold()
            for level, n in zip(self.levels, window.over.sum(0).tolist()):
                self.counts[(net, level)] += int(n)
            steps = [window.steps[row] for row in window.peak_row.tolist()]
            peaks += zip(window.parts, window.peak.tolist(), steps)
        self._windows.clear()
        metrics = {f"alerts/{net}/gradient_{level}": float(n) for (net, level), n in self.counts.items()}
        for level in self.levels:
            metrics[f"alerts/gradient_{level}"] = float(sum(n for (_, lv), n in self.counts.items() if lv == level))
        log_scalars(trainer, metrics, pl_module.counters.env_steps)
        for part, peak_value, at in peaks:
            for level, threshold in self.levels.items():
                above = peak_value > threshold
                if above and not self._above.get((part, level), False):
                    rank_zero_warn(
                        f"gradient {level}: {part} pre-clip gradient norm {peak_value:.4g} exceeded "
                        f"{threshold:.4g} at env step {at}"
                    )
                self._above[(part, level)] = above

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {f"{net}/{level}": n for (net, level), n in self.counts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, n in state_dict["counts"].items():
            net, level = key.split("/")
            self.counts[(net, level)] = n
