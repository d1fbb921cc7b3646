"""Periodic evaluation: deterministic episodes on a separate env every ``every_n_env_steps``, logged as ``eval/*``.

The episodes themselves are run by the data module (the stream owns the envs); this callback decides when, logs the
results against env steps, and writes the first episode's frames to TensorBoard as an image strip, so a user can see
how the policy drives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lit_td3.config import check
from lit_td3.scalars import log_scalars


class EvaluationCallback(pl.Callback):
    """Runs ``data.eval_episodes`` deterministic episodes every ``every_n_env_steps`` env steps and at the end."""

    def __init__(self, every_n_env_steps: int = 10_000, strip_frames: int = 16) -> None:
        """
        Args:
            every_n_env_steps: Env steps between evaluations.
            strip_frames: Frames of the first evaluation episode shown in the ``eval/first_episode`` image strip.
        """
        check("EvaluationCallback.every_n_env_steps", every_n_env_steps, every_n_env_steps >= 1, "at least 1")
        check("EvaluationCallback.strip_frames", strip_frames, strip_frames >= 0, "non-negative")
        self.every_n_env_steps = every_n_env_steps
        self.strip_frames = strip_frames
        self._evaluated_at = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._evaluated_at = pl_module.counters.env_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.counters.env_steps // self.every_n_env_steps != self._evaluated_at // self.every_n_env_steps:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # The last env steps of a run happen after its last batch: evaluate the final policy if a point was passed.
        if pl_module.counters.env_steps // self.every_n_env_steps != self._evaluated_at // self.every_n_env_steps:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._evaluated_at = step = pl_module.counters.env_steps
        if trainer.global_rank != 0 or trainer.datamodule.eval_episodes == 0:
            return
        results = list(trainer.datamodule.evaluate(pl_module.act))
        metrics = {
            "eval/return": float(np.mean([r.episode_return for r in results])),
            "eval/episode_length": float(np.mean([r.length for r in results])),
        }
        for key in sorted({k for r in results for k in r.info}):
            metrics[f"eval/{key}"] = float(np.mean([r.info[key] for r in results if key in r.info]))
        log_scalars(trainer, metrics, step)
        frames = results[0].frames
        if frames is not None and self.strip_frames:
            strip = frame_strip(frames, self.strip_frames)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image("eval/first_episode", strip, step, dataformats="HW")


def frame_strip(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames spread evenly over an episode (T×H×W uint8), side by side as one H×(count·W) image."""
    picks = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in picks], axis=1)
