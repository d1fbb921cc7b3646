"""Checkpoints on an env-step cadence, each referring to a replay-buffer file written beside it.

Lightning's ``every_n_train_steps`` counts optimizer steps (two per TD3 update at most), so the cadence here is the
module's env-step counter. The replay buffer (gigabytes) is never pickled into the checkpoint: each rank writes its
shard to ``replay_buffer-env_step=N[-rankR].pt`` *before* the checkpoint that refers to it, and old shards are deleted
only *after* a newer checkpoint is written, so at every moment the newest complete checkpoint has its buffer. Every
file, ``last.ckpt`` link included, is replaced atomically (``lit_td3.checkpoints``): a kill at any moment leaves the
previous checkpoint loadable, and a write that fails (disk full) stops the run naming the file.

This callback never writes a checkpoint before training has started (a refused resume must not overwrite ``last``)
and never deletes a checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from lit_td3.checkpoints import STATE_KEY, AtomicCheckpointIO, CheckpointError
from lit_td3.config import check
from lit_td3.distributed import gather_from_ranks
from lit_td3.files import CheckpointWriteError, atomic_symlink, remove_stale_temp_files
from lit_td3.module import NonFiniteTrainingError

BUFFER_PREFIX = "replay_buffer-env_step="


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
            buffer_every_n_env_steps: Env steps between replay-buffer writes (null: with every checkpoint; a
                checkpoint in between refers to the last buffer written, and a run resumed from it lacks the
                transitions since; 0: never, a resumed run then refills its buffer from scratch).
            keep_buffers: Replay-buffer files kept: this run's newest ones (2: the previous checkpoint stays a
                fallback with its buffer). Others are deleted once a newer checkpoint is written.
            dirpath: Folder of the checkpoints (null: ``<trainer.default_root_dir>/checkpoints``).
            filename: Checkpoint name pattern; ``{env_step}`` is the env-step count.
        """
        check("EnvStepCheckpoint.every_n_env_steps", every_n_env_steps, every_n_env_steps >= 1, "at least 1")
        check("EnvStepCheckpoint.buffer_every_n_env_steps", buffer_every_n_env_steps,
              buffer_every_n_env_steps is None or buffer_every_n_env_steps >= 0, "null, 0 or a positive env-step count")
        check("EnvStepCheckpoint.keep_buffers", keep_buffers, keep_buffers >= 1, "at least 1")
        super().__init__(
            dirpath=dirpath, filename=filename, save_top_k=-1, save_last="link", save_on_exception=True,
            save_on_train_epoch_end=True, auto_insert_metric_name=False, enable_version_counter=False,
        )
        self.every_n_env_steps = every_n_env_steps
        self.buffer_every = every_n_env_steps if buffer_every_n_env_steps is None else buffer_every_n_env_steps
        self.keep_buffers = keep_buffers
        self._buffer_history: list[str] = []  # this run's buffer files (base names), oldest first
        self._buffer_written_at = -1
        self._buffer_transitions = 0
        self._saved_at = 0
        self._training = False
        self._force_buffer = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # same folder temp file + rename (see its doc)
        if stage == "fit" and trainer.is_global_zero and os.path.isdir(self.dirpath):
            for stale in remove_stale_temp_files(self.dirpath):
                print(f"lit_td3: removed {str(stale)!r}, left by a write that was killed midway", file=sys.stderr)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = pl_module.counters.env_steps
        self._training = True  # from here on, a crash has something worth saving
        self._point_last_at_resumed(trainer)

    def _point_last_at_resumed(self, trainer: pl.Trainer) -> None:
        # After a fallback or a rollback, last.ckpt may name a checkpoint this run did not continue from: a kill
        # before this run's first checkpoint would then resume the wrong one.
        if not trainer.is_global_zero or trainer.ckpt_path is None:
            return
        resumed, last = Path(trainer.ckpt_path).resolve(), Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}.ckpt"
        if resumed.parent == Path(self.dirpath).resolve() and last.resolve() != resumed:
            atomic_symlink(resumed, last)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps = pl_module.counters.env_steps
        if steps // self.every_n_env_steps == self._saved_at // self.every_n_env_steps:
            return
        self._saved_at = steps
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # Nothing is saved before training started (a refused checkpoint must not overwrite last), nor when writing
        # is what failed. A crash checkpoint always has its buffer written, so that the resume loses nothing.
        if not self._training or isinstance(exception, CheckpointWriteError):
            return
        self._force_buffer = True
        try:
            super().on_exception(trainer, pl_module, exception)
        except (NonFiniteTrainingError, CheckpointWriteError) as err:
            print(f"lit_td3: no checkpoint written after {type(exception).__name__}: {err}", file=sys.stderr)
        finally:
            self._force_buffer = False

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["env_step"] = torch.tensor(trainer.lightning_module.counters.env_steps)
        return candidates

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        # Lightning removes the old link and then creates the new one: a kill in between would leave no last.ckpt.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_symlink(filepath, linkpath)
        trainer.strategy.barrier()

    # ------------------------------------------------------------------------------------------------ buffer
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._write_buffer_if_due(trainer)
        super()._save_checkpoint(trainer, filepath)
        self._prune_buffers(trainer)  # only now: until this checkpoint exists, the previous one needs its buffer

    def _write_buffer_if_due(self, trainer: pl.Trainer) -> None:
        steps = trainer.lightning_module.counters.env_steps
        buffer = trainer.datamodule.buffer
        if self.buffer_every == 0 or buffer is None or steps == self._buffer_written_at:
            return
        if not self._force_buffer and self._buffer_history and steps - self._buffer_written_at < self.buffer_every:
            return
        base = f"{BUFFER_PREFIX}{steps}"
        path = Path(self.dirpath) / shard_name(base, trainer.global_rank, trainer.world_size)
        try:
            buffer.save(path)  # atomic; a failed write names the file and leaves earlier files intact
        except CheckpointWriteError as err:
            raise CheckpointWriteError(f"replay buffer: {err}; the previous checkpoint and its buffer are intact") \
                from err
        self._buffer_history.append(base)
        self._buffer_written_at, self._buffer_transitions = steps, len(buffer)

    def _prune_buffers(self, trainer: pl.Trainer) -> None:
        mine = shard_name("", trainer.global_rank, trainer.world_size)
        kept = {shard_name(base, trainer.global_rank, trainer.world_size)
                for base in self._buffer_history[-self.keep_buffers:]}
        for old in Path(self.dirpath).glob(f"{BUFFER_PREFIX}*.pt"):
            if old.name.endswith(mine) and old.name not in kept:
                old.unlink(missing_ok=True)
        del self._buffer_history[:-self.keep_buffers]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if not self._buffer_history:
            return
        checkpoint.setdefault(STATE_KEY, {}).update({
            "buffer_files": [shard_name(self._buffer_history[-1], rank, trainer.world_size)
                             for rank in range(trainer.world_size)],
            # Where the stream stood when the shards were written: the env step, and each shard's transition count.
            "buffer": {"env_step": self._buffer_written_at,
                       "transitions": gather_from_ranks(trainer, self._buffer_transitions)},
        })

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY, {})
        names = state.get("buffer_files", [])
        buffer = trainer.datamodule.buffer
        if not names or buffer is None:
            return
        if len(names) != trainer.world_size:
            raise CheckpointError(
                f"the checkpoint holds {len(names)} replay-buffer shard(s), this run has {trainer.world_size} rank(s): "
                "resume with the same number of devices and nodes"
            )
        # Buffer files live beside the checkpoint they belong to, wherever that checkpoint was given from.
        path = Path(trainer.ckpt_path).parent / names[trainer.global_rank]
        try:
            buffer.load(path)
        except (ValueError, FileNotFoundError) as err:
            raise CheckpointError(f"checkpoint {str(trainer.ckpt_path)!r}: {err}") from None
        written = state["buffer"]
        expected = written["transitions"][trainer.global_rank]
        if len(buffer) != expected:
            raise CheckpointError(f"replay-buffer file {str(path)!r} holds {len(buffer)} transitions, but checkpoint "
                                  f"{str(trainer.ckpt_path)!r} refers to one of {expected}: it was replaced by "
                                  "another run's")
        if written["env_step"] < pl_module.counters.env_steps:
            warnings.warn(f"the replay buffer of {str(trainer.ckpt_path)!r} was written at env step "
                          f"{written['env_step']}, the checkpoint at {pl_module.counters.env_steps}: the transitions in "
                          "between are not in the resumed buffer (EnvStepCheckpoint.buffer_every_n_env_steps)",
                          stacklevel=2)
        self._buffer_history = [names[0].removesuffix(shard_name("", 0, trainer.world_size))]
        self._buffer_written_at, self._buffer_transitions = written["env_step"], expected


def shard_name(base: str, rank: int, world_size: int) -> str:
    """``base.pt`` for a single process, ``base-rankR.pt`` for each rank of a distributed run."""
    return f"{base}-rank{rank}.pt" if world_size > 1 else f"{base}.pt"
