"""Test-only callbacks, for runs in the test process and in CLI subprocesses (by class path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class RankDump(pl.Callback):
    """At the end of fit, rank R writes ``<default_root_dir>/rank_R.pt``: its parameters, counters and buffer, and
    the exploration RNG state a resume restored (None on a fresh run)."""

    resumed_rng = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.resumed_rng = trainer.datamodule.rng.bit_generator.state  # called after the data module's restore

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        buffer = trainer.datamodule.buffer
        stored = buffer.get(torch.arange(len(buffer)))
        torch.save(
            {
                "params": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "env_steps": pl_module.counters.env_steps,
                "critic_updates": pl_module.counters.critic_updates,
                "buffer_len": len(buffer),
                "first_obs": stored.obs["vector"][:5].clone(),
                "resumed_rng": self.resumed_rng,
                "rewards": stored.reward.clone(),
                "sync_checked": [c.checked for c in trainer.callbacks if isinstance(c, NoSyncAfter)],
                "votes_checked": [c.votes_checked for c in trainer.callbacks if isinstance(c, NoSyncAfter)],
                "bucket_views": {name: getattr(net, "gradient_as_bucket_view", None)
                                 for name, net in pl_module._trained.items()},
                "captured": {name: getattr(getattr(pl_module, f"_{name}_step"), "graph", None) is not None
                             for name in ("critic", "actor")},
            },
            Path(trainer.default_root_dir) / f"rank_{trainer.global_rank}.pt",
        )


class NoSyncAfter(pl.Callback):
    """CUDA's sync debug mode set to raise for the span of every batch after ``warmup``, and, under DDP, for every
    signal vote of the rollout stream (counted in ``votes_checked``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.checked, self.votes_checked = warmup, 0, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:  # before the stream looks the vote up
        vote = getattr(trainer.strategy, "signal_vote", None)

        def checked_vote() -> None:
            torch.cuda.set_sync_debug_mode("error")
            try:
                vote()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            self.votes_checked += 1

        if vote is not None:
            trainer.strategy.signal_vote = checked_vote

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.checked += pl_module.counters.critic_updates > self.warmup
