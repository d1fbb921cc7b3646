"""Per-optimizer clipping through Lightning's clip_gradients, on unscaled gradients, at every precision."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision

from lit_td3.module import GradientClipping, TD3Module
from lit_td3.networks import split_parameters
from tests.conftest import (
    EnvStepPerBatch,
    fit_on_random_batches,
    make_module,
    needs_gpu,
)


class PostClipNorms(pl.Callback):
    """After each batch, the L2 norm of the gradients each optimizer actually stepped with."""

    def __init__(self) -> None:
        self.critic: list[float] = []
        self.actor: list[float] = []
        self.pre_clip_critic: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: object) -> None:
        def norm(net: torch.nn.Module) -> float:
            return torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).item()

        self.critic.append(norm(pl_module.critic))
        if all(p.grad is not None for p in pl_module.actor.parameters()):
            self.actor.append(norm(pl_module.actor))
        parts = [v for k, v in pl_module.last_gradient_norms.items() if k.startswith("critic")]
        self.pre_clip_critic.append(math.sqrt(sum(float(v) ** 2 for v in parts)))


def precision_kwargs(precision: str) -> dict:
    if precision == "16-mixed+GradScaler":
        # Lightning makes no scaler on the CPU by itself; give it one so that the unscale path really runs.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed+GradScaler"])
def test_post_clip_norm_never_exceeds_the_limit(precision: str) -> None:
    torch.manual_seed(0)
    clipping = GradientClipping(actor_max_norm=1.0, critic_max_norm=10.0)
    module = make_module(policy_freq=1, gradient_clipping=clipping)
    probe = PostClipNorms()
    trainer = fit_on_random_batches(module, 8, callbacks=[probe], reward_scale=1e2, **precision_kwargs(precision))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if precision.endswith("GradScaler"):
        assert scaler is not None and scaler.get_scale() > 1.0  # gradients really were scaled during backward
    finite_critic = [n for n in probe.critic if math.isfinite(n)]
    finite_actor = [n for n in probe.actor if math.isfinite(n)]
    assert finite_critic and finite_actor
    assert max(finite_critic) <= 10.0 * (1 + 1e-3)
    assert max(finite_actor) <= 1.0 * (1 + 1e-3)
    # clipping was really needed: the pre-clip norms (rewards x100) are far above the limit
    assert max(n for n in probe.pre_clip_critic if math.isfinite(n)) > 100.0


@needs_gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_post_clip_norm_on_the_gpu_with_lightnings_own_scaler(precision: str) -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=1)
    probe = PostClipNorms()
    trainer = fit_on_random_batches(module, 8, callbacks=[probe], reward_scale=1e2, accelerator="gpu",
                                    precision=precision)
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None
    finite_critic = [n for n in probe.critic if math.isfinite(n)]
    assert finite_critic and max(finite_critic) <= 10.0 * (1 + 1e-3)
    assert max(n for n in probe.actor if math.isfinite(n)) <= 1.0 * (1 + 1e-3)
    assert max(n for n in probe.pre_clip_critic if math.isfinite(n)) > 20.0  # clipping really engaged


def test_clipping_off_leaves_large_gradients_alone() -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=1, gradient_clipping=GradientClipping(enabled=False))
    probe = PostClipNorms()
    fit_on_random_batches(module, 3, callbacks=[probe], reward_scale=1e4)
    assert max(probe.critic) > 100.0
    assert probe.critic == pytest.approx(probe.pre_clip_critic, rel=1e-4)


class IndependentNorms(pl.Callback):
    """Per-part gradient norms computed here, before the module's hook clips (callbacks' hooks run first), and the
    norms each network stepped with; next to what the module's telemetry said for the same batch."""

    def __init__(self) -> None:
        self.pre_clip: dict[str, float] = {}
        self.rows: list[tuple[dict[str, float], dict[str, float], dict[str, float]]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: TD3Module, optimizer: object) -> None:
        net = "actor" if optimizer is trainer.optimizers[0] else "critic"
        for part, params in split_parameters(getattr(pl_module, net)).items():
            self.pre_clip[f"{net}_{part}"] = torch.nn.utils.get_total_norm([p.grad for p in params]).item()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: object) -> None:
        stepped = {net: torch.nn.utils.get_total_norm([p.grad for p in getattr(pl_module, net).parameters()]).item()
                   for net in ("actor", "critic")}
        said = {part: float(norm) for part, norm in pl_module.last_gradient_norms.items()}
        self.rows.append((self.pre_clip, said, {**pl_module.latest_metrics, **{f"stepped/{k}": v
                                                                               for k, v in stepped.items()}}))
        self.pre_clip = {}


def test_telemetry_reports_the_norms_an_independent_computation_finds() -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=1, log_every_n_env_steps=1)  # a log point after every batch
    probe = IndependentNorms()
    fit_on_random_batches(module, 4, callbacks=[EnvStepPerBatch(), probe], reward_scale=1e2)
    assert len(probe.rows) == 4
    for pre_clip, said, logged in probe.rows:
        assert said.keys() == pre_clip.keys() == {"actor_cnn", "actor_mlp", "critic_cnn", "critic_mlp"}
        assert said == pytest.approx(pre_clip, rel=1e-5)
        for net, limit in [("actor", 1.0), ("critic", 10.0)]:
            total = math.hypot(pre_clip[f"{net}_cnn"], pre_clip[f"{net}_mlp"])
            assert logged[f"gradients/{net}_cnn_norm"] == pytest.approx(pre_clip[f"{net}_cnn"], rel=1e-5)
            assert logged[f"gradients/{net}_norm_clipped"] == pytest.approx(logged[f"stepped/{net}"], rel=1e-5)
            assert logged[f"gradients/{net}_norm_clipped"] == pytest.approx(min(total, limit), rel=1e-4)
            assert logged[f"gradients/{net}_clip_fraction"] == float(total > limit)
    assert any(row[2]["gradients/critic_clip_fraction"] == 1.0 for row in probe.rows)  # clipping engaged
