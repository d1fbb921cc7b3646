"""Checkpoints on an env-step cadence, each with its replay buffer written beside it.

Lightning's ``every_n_train_steps`` counts optimizer steps (two per TD3 update at most), so the cadence here is the
module's env-step counter. The replay buffer (gigabytes) is never pickled into the checkpoint: each rank writes its
shard to ``replay_buffer-env_step=N[-rankR].pt`` atomically *before* the checkpoint that refers to it, so a kill at
any moment leaves the previous checkpoint and its buffer loadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lit_td3.checkpoints import STATE_KEY, CheckpointError
from lit_td3.config import check


class EnvStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_env_steps``, at the end of training and on a crash, plus the buffer."""

    def __init__(
        self,
        every_n_env_steps: int = 50_000,
        buffer_every_n_env_steps: int | None = None,
        keep_buffers: int = 2,
        dirpath: str | None = None,
        filename: str = "env_step={env_step}",
    ) -> None:
        """
        Args:
            every_n_env_steps: Env steps between checkpoints.
            buffer_every_n_env_steps: Env steps between replay-buffer writes (null: with every checkpoint;
                0: never, a resumed run then refills its buffer from scratch).
            keep_buffers: Replay-buffer files kept (older ones are deleted once a newer one is written).
            dirpath: Folder of the checkpoints (null: ``<trainer.default_root_dir>/checkpoints``).
            filename: Checkpoint name pattern; ``{env_step}`` is the env-step count.
        """
        check("EnvStepCheckpoint.every_n_env_steps", every_n_env_steps, every_n_env_steps >= 1, "at least 1")
        check("EnvStepCheckpoint.keep_buffers", keep_buffers, keep_buffers >= 1, "at least 1")
        super().__init__(
            dirpath=dirpath, filename=filename, save_top_k=-1, save_last="link", save_on_exception=True,
            save_on_train_epoch_end=True, auto_insert_metric_name=False, enable_version_counter=False,
        )
        self.every_n_env_steps = every_n_env_steps
        self.buffer_every = every_n_env_steps if buffer_every_n_env_steps is None else buffer_every_n_env_steps
        self.keep_buffers = keep_buffers
        self._buffer_file: str | None = None
        self._buffer_written_at = -1
        self._saved_at = 0
        self._training = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = pl_module.counters.env_steps
        self._training = True  # from here on, a crash has something worth saving

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps = pl_module.counters.env_steps
        if steps // self.every_n_env_steps == self._saved_at // self.every_n_env_steps:
            return
        self._saved_at = steps
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # An error before training (a refused checkpoint, a bad config) must not overwrite the run's last checkpoint.
        if self._training:
            super().on_exception(trainer, pl_module, exception)

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["env_step"] = torch.tensor(trainer.lightning_module.counters.env_steps)
        return candidates

    # ------------------------------------------------------------------------------------------------ buffer
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._write_buffer_if_due(trainer)
        super()._save_checkpoint(trainer, filepath)

    def _write_buffer_if_due(self, trainer: pl.Trainer) -> None:
        steps = trainer.lightning_module.counters.env_steps
        buffer = trainer.datamodule.buffer
        if self.buffer_every == 0 or buffer is None or steps == self._buffer_written_at:
            return
        if self._buffer_file is not None and steps - self._buffer_written_at < self.buffer_every:
            return
        base = f"replay_buffer-env_step={steps}"
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        buffer.save(Path(self.dirpath) / shard_name(base, trainer.global_rank, trainer.world_size))
        self._buffer_file, self._buffer_written_at = base, steps
        self._prune_buffers(trainer)

    def _prune_buffers(self, trainer: pl.Trainer) -> None:
        mine = shard_name("", trainer.global_rank, trainer.world_size)
        files = [f for f in Path(self.dirpath).glob("replay_buffer-env_step=*.pt") if f.name.endswith(mine)]
        files.sort(key=lambda f: int(f.name.removesuffix(mine).split("=")[1]))
        for old in files[: -self.keep_buffers]:
            old.unlink(missing_ok=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._buffer_file is not None:
            checkpoint.setdefault(STATE_KEY, {})["buffer_files"] = [
                shard_name(self._buffer_file, rank, trainer.world_size) for rank in range(trainer.world_size)
            ]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        names = checkpoint.get(STATE_KEY, {}).get("buffer_files", [])
        if not names or trainer.datamodule.buffer is None:
            return
        if len(names) != trainer.world_size:
            raise CheckpointError(
                f"the checkpoint holds {len(names)} replay-buffer shard(s), this run has {trainer.world_size} rank(s): "
                "resume with the same number of devices and nodes"
            )
        # Buffer files live beside the checkpoint they belong to, wherever that checkpoint was given from.
        trainer.datamodule.buffer.load(Path(trainer.ckpt_path).parent / names[trainer.global_rank])
        self._buffer_file = names[0].removesuffix(shard_name("", 0, trainer.world_size))
        self._buffer_written_at = pl_module.counters.env_steps


def shard_name(base: str, rank: int, world_size: int) -> str:
    """``base.pt`` for a single process, ``base-rankR.pt`` for each rank of a distributed run."""
    return f"{base}-rank{rank}.pt" if world_size > 1 else f"{base}.pt"
