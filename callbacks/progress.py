"""A progress bar counted in env steps, with lit_td3's own figures beside it.

Lightning's bar counts batches, which are neither env steps nor updates in TD3. This one shows env steps of
``data.total_env_steps``, env-steps/s, updates/s, the last episode return, buffer fill and the alert counts.
Turn it off for logs-only runs with ``--trainer.enable_progress_bar false``.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

SHOWN = {
    "perf/env_steps_per_s": "env/s",
    "perf/updates_per_s": "upd/s",
    "rollout/episode_return": "return",
    "eval/return": "eval",
    "alerts/gradient_warning": "warn",
    "alerts/gradient_critical": "crit",
    "alerts/nonfinite_steps": "nonfinite",
}


class EnvStepProgressBar(TQDMProgressBar):
    """TQDM bar whose position is the module's env-step counter."""

    def __init__(self, refresh_every_s: float = 1.0) -> None:
        """
        Args:
            refresh_every_s: Seconds between redraws (a redraw per update would cost more than a small update).
        """
        super().__init__()
        self.refresh_every_s = refresh_every_s
        self._drawn_at = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run continues mid-epoch, where Lightning calls no on_train_epoch_start.
        self._count_env_steps(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._count_env_steps(trainer, pl_module)

    def _count_env_steps(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Total, start and unit in env steps; the start makes the rate count from where this run began."""
        bar = self.train_progress_bar
        bar.reset(total=trainer.datamodule.total_env_steps)
        bar.initial = pl_module.counters.env_steps
        bar.unit = " env steps"
        bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        if self.is_disabled or now - self._drawn_at < self.refresh_every_s:
            return
        self._drawn_at = now
        bar = self.train_progress_bar
        bar.n = pl_module.counters.env_steps
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        latest = pl_module.latest_metrics
        shown: dict[str, Any] = {short: f"{latest[key]:.4g}" for key, short in SHOWN.items() if key in latest}
        buffer = trainer.datamodule.buffer
        if buffer is not None:
            shown["buffer"] = f"{len(buffer)}/{buffer.capacity}"
        return shown

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.is_disabled:
            self.train_progress_bar.n = pl_module.counters.env_steps
            self.train_progress_bar.refresh()
        super().on_train_end(trainer, pl_module)
