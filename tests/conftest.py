"""Shared test helpers: synthetic TD3 batches and a tiny trainer, for tests that need no env."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_td3.buffer import Transition
from lit_td3.module import TD3Module

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

SMALL_IMAGE = {"image": [4, 36, 36], "vector": [3]}
SMALL_NET = {"hidden_sizes": [32, 32], "cnn_features": 32, "cnn_channels": [8, 8, 8]}

# The GPU-only tests; the GPU machine runs them (benchmarks/gpu_session.sh part1).
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels_last, and really re-laid: a 1x1 kernel is contiguous both ways."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def random_batch(shapes: dict[str, list[int]], action_dim: int, batch: int = 16, *, reward_scale: float = 1.0,
                 seed: int = 0) -> Transition:
    g = torch.Generator().manual_seed(seed)

    def obs() -> dict[str, torch.Tensor]:
        out = {}
        if "image" in shapes:
            out["image"] = torch.randint(0, 256, (batch, *shapes["image"]), generator=g, dtype=torch.uint8)
        if "vector" in shapes:
            out["vector"] = torch.randn(batch, *shapes["vector"], generator=g)
        return out

    return Transition(
        obs=obs(),
        action=torch.rand(batch, action_dim, generator=g) * 2 - 1,
        reward=torch.randn(batch, generator=g) * reward_scale,
        next_obs=obs(),
        terminated=(torch.rand(batch, generator=g) < 0.1).float(),
    )


class RandomBatches(IterableDataset):
    def __init__(self, shapes: dict[str, list[int]], action_dim: int, count: int, **kwargs: float) -> None:
        self.shapes, self.action_dim, self.count, self.kwargs = shapes, action_dim, count, kwargs

    def __iter__(self) -> Iterator[Transition]:
        for i in range(self.count):
            yield random_batch(self.shapes, self.action_dim, seed=i, **self.kwargs)


class EnvStepPerBatch(pl.Callback):
    """Pretends batch i comes at env step i + 1, so that the module reaches its log points."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: TD3Module, batch: object, batch_idx: int) -> None:
        pl_module.counters.env_steps = batch_idx + 1


def make_module(shapes: dict[str, list[int]] = SMALL_IMAGE, action_dim: int = 2, **kwargs: object) -> TD3Module:
    from lit_td3.module import GradientClipping
    from lit_td3.networks import NetworkConfig

    kwargs.setdefault("network", NetworkConfig(**SMALL_NET))
    kwargs.setdefault("gradient_clipping", GradientClipping())
    return TD3Module(observation_shapes=shapes, action_dim=action_dim, **kwargs)


def _fit(module: TD3Module, loader: DataLoader, callbacks: Sequence[pl.Callback], ckpt_path: object = None,
         **trainer_kwargs: object) -> pl.Trainer:
    """Trains ``module`` on ``loader`` with a quiet one-device Trainer (no logger, checkpoints, bar or summary)."""
    trainer_kwargs.setdefault("accelerator", "cpu")
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = pl.Trainer(devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def fit_on_random_batches(module: TD3Module, count: int, *, callbacks: list[pl.Callback] | None = None,
                          **trainer_kwargs: object) -> pl.Trainer:
    shapes, action_dim = module.hparams.observation_shapes, module.hparams.action_dim
    reward_scale = trainer_kwargs.pop("reward_scale", 1.0)
    loader = DataLoader(RandomBatches(shapes, action_dim, count, reward_scale=reward_scale), batch_size=None)
    return _fit(module, loader, callbacks or [], **trainer_kwargs)


def fit_batches(module: TD3Module, batches: list[Transition], callbacks: Sequence[pl.Callback] = (), *,
                accelerator: str = "cpu", epochs: int = 1, ckpt_path: object = None) -> pl.Trainer:
    """Trains ``module`` on ``batches`` (one per training step, every epoch), from ``ckpt_path`` when given."""
    return _fit(module, DataLoader(batches, batch_size=None), callbacks, ckpt_path,
                accelerator=accelerator, max_epochs=epochs)


@pytest.fixture
def small_module() -> TD3Module:
    torch.manual_seed(0)
    return make_module()


def assert_same_training(reference: TD3Module, candidate: TD3Module) -> None:
    """Two modules trained on the same batches from the same seed (eager and graphed, eager and compiled) ended with
    the same counters, the same weights under the same checkpoint keys, and the same window means at the last log
    point (losses, Q statistics, gradient norms of every part)."""
    assert asdict(candidate.counters) == asdict(reference.counters)
    assert list(candidate.state_dict()) == list(reference.state_dict())
    for (name, a), b in zip(reference.state_dict().items(), candidate.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert candidate.latest_metrics.keys() == reference.latest_metrics.keys()
    assert any(k.startswith("gradients/actor_cnn") for k in candidate.latest_metrics)
    for key, value in reference.latest_metrics.items():
        assert math.isclose(candidate.latest_metrics[key], value, rel_tol=1e-3, abs_tol=1e-5), key
