"""What each rank of a distributed run knows and rank 0 must log or save: gathered, never averaged away.

Lightning's strategies all-reduce tensors; rollout statistics and stream states are small Python objects (episode
results, RNG states), so they travel with ``torch.distributed.all_gather_object``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed

if TYPE_CHECKING:
    import pytorch_lightning as pl

T = TypeVar("T")


def gather_from_ranks(trainer: pl.Trainer | None, obj: T) -> list[T]:
    """``obj`` of every rank, in rank order; ``[obj]`` in a single process.

    A collective: in a distributed run every rank must call it at the same point (the callers do so at env-step log
    points and checkpoints, which all ranks reach in lockstep).
    """
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
