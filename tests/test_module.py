"""TD3Module: gradient isolation, the delayed actor update, targets, optimizers and checkpoints."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from callbacks import GradientAlertCallback
from lit_td3.config import ConfigError
from lit_td3.losses import critic_loss
from lit_td3.module import GradientClipping, TD3Module
from tests.conftest import (
    SMALL_IMAGE,
    EnvStepPerBatch,
    assert_same_training,
    fit_batches,
    fit_on_random_batches,
    is_channels_last,
    make_module,
    random_batch,
)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters()))


def test_critic_loss_gives_the_actor_and_targets_no_gradient(small_module: TD3Module) -> None:
    batch = random_batch(SMALL_IMAGE, 2)
    q1, q2 = small_module.critic(batch.obs, batch.action)
    with torch.no_grad():
        target = batch.reward + 0.99 * torch.minimum(*small_module.critic_target(batch.next_obs, batch.action))
    loss, _ = critic_loss(q1, q2, target)
    loss.backward()
    assert all(p.grad is None for p in small_module.actor.parameters())
    assert all(p.grad is None for p in small_module.actor_target.parameters())
    assert all(p.grad is None for p in small_module.critic_target.parameters())
    assert all(p.grad is not None for p in small_module.critic.parameters())


def test_actor_and_critic_own_separate_encoders(small_module: TD3Module) -> None:
    actor_ids = {id(p) for p in small_module.actor.parameters()}
    critic_ids = {id(p) for p in small_module.critic.parameters()}
    assert actor_ids.isdisjoint(critic_ids)
    assert small_module.actor.encoder.cnn is not small_module.critic.encoder.cnn


def test_targets_are_in_no_optimizer_and_need_no_gradient(small_module: TD3Module) -> None:
    actor_opt, critic_opt = small_module.configure_optimizers()
    optimized = {id(p) for opt in (actor_opt, critic_opt) for g in opt.param_groups for p in g["params"]}
    targets = list(small_module.actor_target.parameters()) + list(small_module.critic_target.parameters())
    assert not any(id(p) in optimized for p in targets)
    assert not any(p.requires_grad for p in targets)
    # each optimizer: its own network, CNN and MLP in separate groups with their own learning rates
    assert {id(p) for g in actor_opt.param_groups for p in g["params"]} == {id(p) for p in small_module.actor.parameters()}
    assert [(g["name"], g["lr"]) for g in actor_opt.param_groups] == [("cnn", 1e-4), ("mlp", 3e-4)]
    assert [(g["name"], g["lr"]) for g in critic_opt.param_groups] == [("cnn", 1e-4), ("mlp", 3e-4)]


class RecordSteps(pl.Callback):
    """Records, for every batch, whether the actor, the critic and the targets moved."""

    def __init__(self) -> None:
        self.moves: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: TD3Module, batch: object, batch_idx: int) -> None:
        self._before = {name: snapshot(getattr(pl_module, name))
                        for name in ("actor", "critic", "actor_target", "critic_target")}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: object) -> None:
        self.moves.append({name: changed(before, getattr(pl_module, name)) for name, before in self._before.items()})


@pytest.mark.parametrize("policy_freq", [2, 3])
def test_delayed_actor_and_target_updates_follow_the_module_counter(policy_freq: int) -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=policy_freq)
    recorder = RecordSteps()
    trainer = fit_on_random_batches(module, 10, callbacks=[recorder])
    expected_actor = [(i + 1) % policy_freq == 0 for i in range(10)]
    assert [m["actor"] for m in recorder.moves] == expected_actor
    assert [m["actor_target"] for m in recorder.moves] == expected_actor
    assert [m["critic_target"] for m in recorder.moves] == expected_actor
    assert all(m["critic"] for m in recorder.moves)
    assert module.counters.critic_updates == 10
    assert module.counters.actor_updates == 10 // policy_freq
    # Lightning's global_step counts both optimizers' steps: it is not the update count
    assert trainer.global_step == 10 + 10 // policy_freq


class CriticAcrossActorStep(pl.Callback):
    """Snapshots the critic (and its gradients) when the actor's optimizer is about to step."""

    def __init__(self) -> None:
        self.checks: list[tuple[bool, bool]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: TD3Module, optimizer: object) -> None:
        if pl_module._optimized[id(optimizer)].name == "actor":
            self._critic = snapshot(pl_module.critic)
            self._grads = [p.grad.clone() for p in pl_module.critic.parameters()]
            self._actor_grads_present = all(p.grad is not None for p in pl_module.actor.parameters())
            # the actor's backward ran with the critic frozen: it could not add to the critic's gradients
            self._critic_frozen = not any(p.requires_grad for p in pl_module.critic.parameters())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: object) -> None:
        unchanged = not changed(self._critic, pl_module.critic)
        same_grads = all(torch.equal(g, p.grad) for g, p in zip(self._grads, pl_module.critic.parameters()))
        self.checks.append((unchanged and same_grads and self._critic_frozen, self._actor_grads_present))


def test_actor_loss_never_moves_the_critic() -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=1)
    probe = CriticAcrossActorStep()
    fit_on_random_batches(module, 4, callbacks=[probe])
    assert probe.checks == [(True, True)] * 4


def test_the_actor_step_computes_q1_alone() -> None:
    """The actor's loss is -mean Q1(s, mu(s)), the paper's: each critic step runs both heads, each actor step only
    Q1's (Q2 there would be wasted work), and Q1 alone is the first of the pair."""
    torch.manual_seed(0)
    module = make_module(policy_freq=1)
    head_calls: list[str] = []
    for name in ("q1", "q2"):
        getattr(module.critic, name).register_forward_hook(lambda *_, name=name: head_calls.append(name))
    fit_on_random_batches(module, 3)
    assert (head_calls.count("q1"), head_calls.count("q2")) == (6, 3)
    batch = random_batch(SMALL_IMAGE, action_dim=2)
    with torch.no_grad():
        assert module.critic.q1_value(batch.obs, batch.action).equal(module.critic(batch.obs, batch.action)[0])


def test_soft_update_is_polyak_averaging() -> None:
    torch.manual_seed(0)
    module = make_module(tau=0.25)
    with torch.no_grad():
        for p in module.actor.parameters():
            p.add_(1.0)
    online = snapshot(module.actor)
    target = snapshot(module.actor_target)
    module._soft_update_targets()
    for o, t, new in zip(online, target, module.actor_target.parameters()):
        torch.testing.assert_close(new, 0.25 * o + 0.75 * t)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy_freq": 0}, "model.policy_freq=0"),
        ({"gamma": 1.0}, "model.gamma=1.0"),
        ({"tau": 0.0}, "model.tau=0.0"),
        ({"actor_cnn_lr": -1e-4}, "model.actor_cnn_lr=-0.0001"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_module(**kwargs)


@pytest.mark.parametrize(("name", "value"), [("actor_max_norm", -1.0), ("critic_max_norm", 0.0), ("norm_type", 1.0)])
def test_bad_clipping_names_the_field(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"model.gradient_clipping.{name}"):
        GradientClipping(**{name: value})


def test_compiled_updates_match_eager_updates_with_their_telemetry() -> None:
    """``model.compile: true`` compiles actor and critic in place and the telemetry's arithmetic: the same weights,
    optimizer steps, alerts and logged window means (gradient norms included) as eager, end to end in a fit."""
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = make_module(policy_freq=2, compile=compiled, log_every_n_env_steps=4)
        alerts = GradientAlertCallback(1.0, 10.0)
        trainer = fit_on_random_batches(module, 8, callbacks=[EnvStepPerBatch(), alerts])
        runs[compiled] = module, trainer, alerts.counts
    (eager, eager_trainer, eager_alerts), (compiled, compiled_trainer, compiled_alerts) = runs[False], runs[True]
    assert compiled._telemetry.fused and not eager._telemetry.fused
    assert compiled_alerts == eager_alerts and eager_alerts[("critic", "warning")] > 0
    assert compiled_trainer.global_step == eager_trainer.global_step == 8 + 4
    assert_same_training(eager, compiled)  # compiled in place: the checkpoint keys stay eager's too


def test_a_cpu_run_keeps_its_convolutions_channels_last() -> None:
    torch.manual_seed(0)
    module = make_module()
    fit_on_random_batches(module, 4)
    convolutions = [p for p in module.parameters() if p.dim() == 4]
    assert len(convolutions) == 4 * 3  # NatureCNN's three, in the actor, critic and both targets
    assert all(is_channels_last(p) for p in convolutions)


def test_resume_from_optimizer_state_of_another_layout_equals_a_resume_from_the_same_layout(tmp_path) -> None:
    """A checkpoint whose Adam moments are NCHW (as a GPU run writes them) resumed on the CPU, where the convolutions
    are channels_last, continues exactly as the same checkpoint with channels_last moments: the moments take the
    parameters' layout (without that, fused Adam pairs the wrong elements and the weights drift)."""
    batches = [random_batch(SMALL_IMAGE, 2, seed=i) for i in range(12)]

    torch.manual_seed(0)
    fit_batches(make_module(policy_freq=2), batches[:6]).save_checkpoint(tmp_path / "channels_last.ckpt")
    checkpoint = torch.load(tmp_path / "channels_last.ckpt", weights_only=False)
    relaid = 0
    for optimizer in checkpoint["optimizer_states"]:
        for state in optimizer["state"].values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 4:
                    assert value.is_contiguous(memory_format=torch.channels_last)
                    state[key], relaid = value.contiguous(), relaid + 1
    assert relaid == 2 * 2 * 3  # exp_avg and exp_avg_sq of the actor's and the critic's three convolutions
    torch.save(checkpoint, tmp_path / "nchw.ckpt")
    same_layout, other_layout = make_module(policy_freq=2), make_module(policy_freq=2)
    fit_batches(same_layout, batches[6:], epochs=2, ckpt_path=tmp_path / "channels_last.ckpt")
    fit_batches(other_layout, batches[6:], epochs=2, ckpt_path=tmp_path / "nchw.ckpt")
    assert other_layout.counters.critic_updates == same_layout.counters.critic_updates == 12
    for (name, a), b in zip(same_layout.state_dict().items(), other_layout.state_dict().values()):
        assert torch.equal(a, b), name
