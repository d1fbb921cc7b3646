"""A test-only callback for the distributed tests: each rank writes what it trained and stepped."""

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
            },
            Path(trainer.default_root_dir) / f"rank_{trainer.global_rank}.pt",
        )
