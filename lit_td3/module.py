"""TD3Module: the learner. Twin critics, clipped double-Q, target policy smoothing, delayed actor and targets.

Manual optimization with two optimizers (actor, critic), each with a CNN and an MLP parameter group. Gradients are
clipped per optimizer with Lightning's ``clip_gradients`` in ``on_before_optimizer_step``, where they are already
unscaled under ``16-mixed`` (LIGHTNING_NOTES 3); the pre- and post-clip norms are the telemetry.

The module never touches an env or the buffer: the rollout stream (``lit_td3.data``) hands it batches and calls
``act``. The counters that define the run (env steps, updates, episodes) live here and in its checkpoint; Lightning's
``global_step`` counts optimizer steps and decides nothing.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lit_td3.buffer import Transition
from lit_td3.config import ConfigError, check
from lit_td3.distributed import check_strategy, gather_from_ranks, sum_over_ranks
from lit_td3.events import DeviceEvents, read_events
from lit_td3.graphs import (
    DDP_WARMUP,
    FULL_PRECISIONS,
    WARMUP,
    GraphedStep,
    check_cuda_graphs,
)
from lit_td3.losses import actor_loss, critic_loss, smoothed_target_action, td_target
from lit_td3.networks import Actor, NetworkConfig, TwinCritic, split_parameters
from lit_td3.scalars import WindowMeans, log_scalars
from lit_td3.telemetry import StepTelemetry


@dataclass
class GradientClipping:
    """Per-optimizer gradient clipping, as the original report's ``gradient_clipping`` block."""

    enabled: bool = True
    """Clip at all; off gives the unclipped baseline of a before/after comparison."""
    actor_max_norm: float = 1.0
    """L2 norm limit of the actor's gradients (CNN and MLP together)."""
    critic_max_norm: float = 10.0
    """L2 norm limit of the critic's gradients (CNN and both Q-heads together)."""
    norm_type: float = 2.0
    """Norm of the limit; Lightning's ``clip_gradients`` clips the L2 norm, so only 2.0 is accepted."""

    def __post_init__(self) -> None:
        for name in ("actor_max_norm", "critic_max_norm"):
            value = getattr(self, name)
            check(f"model.gradient_clipping.{name}", value, value > 0, "a positive norm")
        check("model.gradient_clipping.norm_type", self.norm_type, self.norm_type == 2.0,
              "2.0 (Lightning's clip_gradients clips the L2 norm)")


@dataclass
class RunCounters:
    """The counts that define where a run is, and its fault counts; saved in every checkpoint."""

    env_steps: int = 0
    critic_updates: int = 0
    actor_updates: int = 0
    episodes: int = 0
    nonfinite_steps: int = 0
    """Optimizer steps skipped for a NaN/inf loss or gradient (``alerts/nonfinite_steps``)."""
    consecutive_nonfinite: dict[str, int] = field(default_factory=lambda: {"actor": 0, "critic": 0})
    """Per network, its skipped steps since its last finite one."""
    nonfinite_env_outputs: int = 0
    """Env steps discarded at the env boundary for a NaN/inf observation or reward."""
    q_bound_alerts: int = 0
    """Actor updates whose mean Q1(s, mu(s)) was beyond the Q bound (``model.reward_bound``)."""

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RunCounters:
        """Counters from a checkpoint; counts this version does not know are dropped, missing ones start at 0."""
        known = {f.name for f in fields(cls)} - {"consecutive_nonfinite"}  # a streak is not carried over
        return cls(**{k: v for k, v in state.items() if k in known})


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive non-finite updates of one network: the run stops, its checkpoint holds finite weights."""


class StepOutput(NamedTuple):
    """What one optimizer step leaves for logging: metrics (window means) and pre-clip norms (gradient alerts)."""

    metrics: dict[str, Tensor]
    gradient_norms: dict[str, Tensor]


@dataclass
class _Optimized:
    """What the telemetry needs to know about one optimizer."""

    name: str
    parts: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    max_norm: float = 0.0


class TD3Module(pl.LightningModule):
    """TD3 (Fujimoto et al., 2018) from pixels, with per-optimizer clipping and gradient telemetry."""

    def __init__(
        self,
        gamma: float = 0.99,
        tau: float = 0.005,
        policy_freq: int = 2,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        actor_cnn_lr: float = 1e-4,
        actor_mlp_lr: float = 3e-4,
        critic_cnn_lr: float = 1e-4,
        critic_mlp_lr: float = 3e-4,
        gradient_clipping: GradientClipping | None = None,
        network: NetworkConfig | None = None,
        log_every_n_env_steps: int = 1000,
        max_consecutive_nonfinite: int = 10,
        compile: bool = False,
        cuda_graphs: bool = False,
        observation_shapes: dict[str, list[int]] | None = None,
        action_dim: int | None = None,
        reward_bound: float | None = None,
        q_bound_margin: float = 2.0,
    ) -> None:
        """
        Args:
            gamma: Discount factor.
            tau: Polyak rate of the soft target updates.
            policy_freq: Critic updates per actor (and target) update: the delayed policy update.
            policy_noise: Std of the target policy smoothing noise (actions live in [-1, 1]).
            noise_clip: The smoothing noise is clipped to [-noise_clip, noise_clip].
            actor_cnn_lr: Learning rate of the actor's CNN encoder.
            actor_mlp_lr: Learning rate of the actor's MLP head.
            critic_cnn_lr: Learning rate of the critic's CNN encoder.
            critic_mlp_lr: Learning rate of the critic's Q-heads.
            gradient_clipping: Per-optimizer clipping (enabled, actor_max_norm, critic_max_norm, norm_type).
            network: Network sizes.
            log_every_n_env_steps: Env steps between log points; between them nothing leaves the GPU.
            max_consecutive_nonfinite: Consecutive non-finite updates (each skipped) that stop the run.
            compile: Compile actor and critic with ``torch.compile`` (telemetry and clipping stay exact), and the
                telemetry's arithmetic too (``lit_td3.telemetry``).
            cuda_graphs: Capture the critic step and the actor step (with the target update) as CUDA graphs and
                replay them for each batch: the same kernels, clipping and telemetry, issued at once instead of one by
                one from Python; the telemetry's arithmetic is compiled first (``lit_td3.telemetry``), so that its few
                dozen scalar operations are a few fused kernels. Needs one CUDA device and precision 32-true or
                64-true (``lit_td3.graphs``).
            observation_shapes: Filled from the env by the data module; set only to load a checkpoint by hand.
            action_dim: Filled from the env by the data module; set only to load a checkpoint by hand.
            reward_bound: r_max, the largest |reward| of one env step, if known; enables the Q-bound alert: an actor
                update whose mean Q1(s, mu(s)) exceeds ``q_bound_margin * r_max / (1 - gamma)`` in magnitude.
            q_bound_margin: Factor over r_max / (1 - gamma), the largest |Q| any policy can earn, before the alert.
        """
        super().__init__()
        gradient_clipping = gradient_clipping or GradientClipping()
        network = network or NetworkConfig()
        check("model.gamma", gamma, 0.0 <= gamma < 1.0, "a discount in [0, 1)")
        check("model.tau", tau, 0.0 < tau <= 1.0, "a Polyak rate in (0, 1]")
        check("model.policy_freq", policy_freq, policy_freq >= 1, "at least 1 critic update per actor update")
        check("model.policy_noise", policy_noise, policy_noise >= 0, "non-negative")
        check("model.noise_clip", noise_clip, noise_clip >= 0, "non-negative")
        for name, lr in [("actor_cnn_lr", actor_cnn_lr), ("actor_mlp_lr", actor_mlp_lr),
                         ("critic_cnn_lr", critic_cnn_lr), ("critic_mlp_lr", critic_mlp_lr)]:
            check(f"model.{name}", lr, lr > 0, "a positive learning rate")
        check("model.log_every_n_env_steps", log_every_n_env_steps, log_every_n_env_steps >= 1, "at least 1")
        check("model.max_consecutive_nonfinite", max_consecutive_nonfinite, max_consecutive_nonfinite >= 1,
              "at least 1")
        check("model.reward_bound", reward_bound, reward_bound is None or reward_bound > 0, "null or positive")
        check("model.q_bound_margin", q_bound_margin, q_bound_margin >= 1.0, "at least 1.0")
        self.save_hyperparameters(ignore=["gradient_clipping", "network"])
        # Plain dicts, not dataclasses, so that checkpoints load with torch.load(weights_only=True).
        self.hparams["gradient_clipping"] = asdict(gradient_clipping)
        self.hparams["network"] = asdict(network)
        self.automatic_optimization = False
        self.clipping = gradient_clipping
        self.network_config = network
        self.log_every_n_env_steps = log_every_n_env_steps
        self.counters = RunCounters()
        self.latest_metrics: dict[str, float] = {}
        self.last_gradient_norms: dict[str, Tensor] = {}
        self.window = WindowMeans()
        self._logged_at = 0
        self._optimized: dict[int, _Optimized] = {}
        self._loss = torch.zeros(())  # the loss of the step being taken, for the non-finite guard
        self._step_telemetry = StepOutput({}, {})  # filled by on_before_optimizer_step
        self._q_limit = None if reward_bound is None else q_bound_margin * reward_bound / (1.0 - gamma)
        self._q_over = False
        # Per-update flags counted on the device, read at log points (no host sync per update).
        self._events = {name: DeviceEvents() for name in ("nonfinite_critic", "nonfinite_actor", "q_bound")}
        self._telemetry = StepTelemetry(fused=compile or cuda_graphs)
        self._env_step = torch.zeros((), dtype=torch.float64)  # this update's env step; on the device from train start
        self._critic_step, self._actor_step = self.update_critic, self.update_actor  # graphed in on_train_start
        self._policy_graphs: dict[int, GraphedStep] = {}  # act()'s graphs under cuda_graphs, by batch size
        # The online networks as the updates call them: themselves, or under lit_td3.distributed.TD3DDPStrategy
        # their DistributedDataParallel wrappers. A plain dict, so that the wrappers are no submodules.
        self._trained: dict[str, torch.nn.Module] = {}
        if observation_shapes is not None and action_dim is not None:
            self._build_networks(observation_shapes, action_dim)

    # ------------------------------------------------------------------------------------------------ networks
    def _build_networks(self, observation_shapes: Mapping[str, list[int]], action_dim: int) -> None:
        self.hparams["observation_shapes"] = {k: list(v) for k, v in observation_shapes.items()}
        self.hparams["action_dim"] = int(action_dim)
        self.actor = Actor(observation_shapes, action_dim, self.network_config)
        self.critic = TwinCritic(observation_shapes, action_dim, self.network_config)
        # Targets: copies that only ever move by Polyak averaging; in no optimizer, never given gradients.
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        if self.hparams.compile:
            # In place (nn.Module.compile): the same modules, parameters and gradients, so telemetry and clipping
            # see exactly what they see in eager mode, and the state dict keeps its keys.
            self.actor.compile()
            self.critic.compile()
        self.distribute(None)

    def restore_from_rank_zero(self, observation_shapes: Mapping[str, list[int]], action_dim: int,
                               counters: Mapping[str, Any]) -> None:
        """Builds the networks of a trained module's shapes, where this module has none, and takes its counters: in
        the main process of ranks started by ``spawn`` or ``fork``, which never ran ``setup``. Lightning then loads
        rank 0's weights into them (``lit_td3.distributed``)."""
        if not hasattr(self, "actor"):
            self._build_networks(observation_shapes, action_dim)
        self.counters = RunCounters.from_state(counters)

    def distribute(self, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None) -> None:
        """Runs the updates' forward passes through ``wrap(actor)`` and ``wrap(critic)`` (the DistributedDataParallel
        wrappers of ``TD3DDPStrategy``, which all-reduce each network's gradients in its backward), or, with None,
        through the networks themselves."""
        self._trained = {"actor": self.actor, "critic": self.critic}
        if wrap is not None:
            self._trained = {name: wrap(network) for name, network in self._trained.items()}

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage == "fit":
            check_strategy(trainer.strategy)
            if self.hparams.cuda_graphs:
                check_cuda_graphs(trainer.strategy.root_device, trainer.world_size, trainer.precision,
                                  self.hparams.compile)
        if not hasattr(self, "actor"):
            dm = trainer.datamodule
            self._build_networks(dm.observation_shapes, dm.action_dim)
        if trainer.strategy.root_device.type == "cpu":
            # oneDNN's CPU convolutions run faster on NHWC weights: a CPU pixel update went from 5% slower than the
            # plain NCHW loop of update_time.py to 9% faster (BENCHMARKS.md).
            # The GPU keeps cuDNN's NCHW: channels_last saved 4% of a graphed update there and slowed eager ones.
            self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Deterministic actions mu(s) for a batch of env observations (the stream adds the exploration noise)."""
        obs_t = {k: torch.as_tensor(v, device=self.device) for k, v in obs.items()}
        return self._policy(obs_t).float().cpu().numpy()

    def _policy(self, obs: Mapping[str, Tensor]) -> Tensor:
        """mu(s); under ``model.cuda_graphs`` a CUDA-graph replay, one graph per batch size (the training envs',
        evaluation's): a forward pass at a batch of one env is a few dozen small kernels, and the env step waits for
        it (0.36 ms eager, 0.12 ms replayed on an H200: ``benchmarks/act_time.py``). The graph reads the actor's
        weights where the optimizer updates them in place, so it always acts with the current ones."""
        if not (self.hparams.cuda_graphs and self.device.type == "cuda"):
            return self.actor(obs)
        batch_size = len(next(iter(obs.values())))
        if batch_size not in self._policy_graphs:
            self._policy_graphs[batch_size] = GraphedStep(self.actor)
        return self._policy_graphs[batch_size](obs)

    # ------------------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        # Fused Adam: one kernel per step, and it skips a step flagged non-finite on the device (found_inf). Only at
        # full precision: under AMP it unscales inside step(), where clip_gradients cannot reach, and Lightning
        # refuses to clip it (LIGHTNING_NOTES 3).
        fused = (self._trainer.precision if self._trainer is not None else "32-true") in FULL_PRECISIONS
        actor_opt = self._adam(split_parameters(self.actor), hp.actor_cnn_lr, hp.actor_mlp_lr, fused, hp.cuda_graphs)
        critic_opt = self._adam(split_parameters(self.critic), hp.critic_cnn_lr, hp.critic_mlp_lr, fused,
                                hp.cuda_graphs)
        self._optimized = {
            id(actor_opt): _Optimized("actor", split_parameters(self.actor), self.clipping.actor_max_norm),
            id(critic_opt): _Optimized("critic", split_parameters(self.critic), self.clipping.critic_max_norm),
        }
        return [actor_opt, critic_opt]

    @staticmethod
    def _adam(parts: dict[str, list[torch.nn.Parameter]], cnn_lr: float, mlp_lr: float, fused: bool,
              capturable: bool) -> torch.optim.Adam:
        groups = [{"params": parts["mlp"], "lr": mlp_lr, "name": "mlp"}]
        if parts["cnn"]:
            groups.insert(0, {"params": parts["cnn"], "lr": cnn_lr, "name": "cnn"})
        if fused:
            return torch.optim.Adam(groups, fused=True, capturable=capturable)
        return torch.optim.Adam(groups, foreach=True)

    def on_train_start(self) -> None:
        # A resumed checkpoint restores its optimizers' learning rates; the configured ones win (rollback plan).
        hp = self.hparams
        actor_opt, critic_opt = self.optimizers()
        for opt, lrs in [(actor_opt, {"cnn": hp.actor_cnn_lr, "mlp": hp.actor_mlp_lr}),
                         (critic_opt, {"cnn": hp.critic_cnn_lr, "mlp": hp.critic_mlp_lr})]:
            for group in opt.param_groups:
                group["lr"] = lrs[group["name"]]
            _lay_out_like_parameters(opt.optimizer)
        self._env_step = torch.zeros((), dtype=torch.float64, device=self.device)
        if hp.cuda_graphs:
            warmup = WARMUP if self._trained["critic"] is self.critic else DDP_WARMUP
            self._critic_step = GraphedStep(self.update_critic, partial(_count_replayed_step, critic_opt), warmup)
            self._actor_step = GraphedStep(self.update_actor, partial(_count_replayed_step, actor_opt), warmup)

    # ------------------------------------------------------------------------------------------------ TD3
    def training_step(self, batch: Transition, batch_idx: int) -> None:
        self._env_step.fill_(self.counters.env_steps)
        # Target policy smoothing noise, drawn outside any CUDA graph: eager and graphed updates take the same numbers
        # from the same generator, whose state checkpoints save and restore.
        noise = torch.randn_like(batch.action) * self.hparams.policy_noise
        critic = self._critic_step(batch, noise)  # update_critic, or its CUDA-graph replay
        self.counters.critic_updates += 1
        self.window.add(critic.metrics)
        gradient_norms = dict(critic.gradient_norms)
        # Delayed policy update, counted in critic updates (global_step counts both optimizers' steps).
        if self.counters.critic_updates % self.hparams.policy_freq == 0:
            actor = self._actor_step(batch)  # update_actor, or its CUDA-graph replay
            self.counters.actor_updates += 1
            self.window.add(actor.metrics)
            gradient_norms.update(actor.gradient_norms)
        self.last_gradient_norms = gradient_norms  # this batch's pre-clip norms, for callbacks.GradientAlertCallback
        self._log_if_due()

    def update_critic(self, batch: Transition, noise: Tensor) -> StepOutput:
        """One critic step: clipped double-Q target with target policy smoothing by ``noise`` ~ N(0, sigma)."""
        hp = self.hparams
        with torch.no_grad():
            next_action = smoothed_target_action(self.actor_target(batch.next_obs), noise, hp.noise_clip)
            next_q1, next_q2 = self.critic_target(batch.next_obs, next_action)
            target = td_target(batch.reward, batch.terminated, next_q1, next_q2, hp.gamma)
        q1, q2 = self._trained["critic"](batch.obs, batch.action)
        loss_q, q_info = critic_loss(q1, q2, target)
        telemetry = self._optimize(self.optimizers()[1], loss_q)
        return StepOutput({"train/critic_loss": loss_q, **q_info, **telemetry.metrics}, telemetry.gradient_norms)

    def update_actor(self, batch: Transition) -> StepOutput:
        """One actor step on Q1(s, mu(s)), then the soft update of both targets."""
        actor_opt = self.optimizers()[0]
        with self.toggled_optimizer(actor_opt):  # the actor's loss must not give the critic gradients
            # Q1 only, as in the paper; through the critic itself, whose frozen parameters DDP must not wait for
            q1_of_policy = self.critic.q1_value(batch.obs, self._trained["actor"](batch.obs))
            loss_pi = actor_loss(q1_of_policy)
            telemetry = self._optimize(actor_opt, loss_pi)
        self._soft_update_targets()
        return StepOutput({"train/actor_loss": loss_pi, **telemetry.metrics}, telemetry.gradient_norms)

    def _optimize(self, optimizer: pl.core.optimizer.LightningOptimizer, loss: Tensor) -> StepOutput:
        self._loss = loss.detach()
        self._step_telemetry = StepOutput({}, {})
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()  # clipping and telemetry: on_before_optimizer_step, after the AMP unscale
        return self._step_telemetry

    @torch.no_grad()
    def _soft_update_targets(self) -> None:
        """theta' <- tau * theta + (1 - tau) * theta', one foreach kernel per network pair."""
        for online, target in [(self.actor, self.actor_target), (self.critic, self.critic_target)]:
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), self.hparams.tau)

    # ------------------------------------------------------------------------------------------------ clipping
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Telemetry, non-finite guard and clipping, on gradients that are already unscaled."""
        opt = self._optimized[id(optimizer)]
        parts = {part: [p.grad for p in params if p.grad is not None] for part, params in opt.parts.items()}
        parts = {part: grads for part, grads in parts.items() if grads}
        grads = [g for part_grads in parts.values() for g in part_grads]
        fn = self._telemetry
        part_norms, total, nonfinite, clips = fn.step_statistics(
            torch._foreach_norm(grads), [len(g) for g in parts.values()], self._guarded_loss(), opt.max_norm,
            self._nonfinite_events(opt), self._env_step)
        self._guard(opt, optimizer, nonfinite)
        named_norms = {f"{opt.name}_{part}": part_norms[i] for i, part in enumerate(parts)}
        telemetry = {f"gradients/{name}_norm": norm for name, norm in named_norms.items()}
        if self.clipping.enabled:
            self.clip_gradients(optimizer, gradient_clip_val=opt.max_norm, gradient_clip_algorithm="norm")
            telemetry[f"gradients/{opt.name}_norm_clipped"] = fn.total_norm(torch._foreach_norm(grads))
            telemetry[f"gradients/{opt.name}_clip_fraction"] = clips
        else:
            telemetry[f"gradients/{opt.name}_norm_clipped"] = total
        self._step_telemetry = StepOutput(telemetry, named_norms)

    def _guarded_loss(self) -> Tensor:
        """The loss the non-finite guard reads: this rank's, or under DDP the sum of all ranks' (non-finite if any
        is), so that every rank flags the same steps: gradients are all-reduced, losses are each rank's own, and all
        ranks must skip a step together or none, or the replicas' weights would part ways."""
        if self.trainer.world_size == 1:
            return self._loss
        return sum_over_ranks(self._loss)

    def _scaler_skips_steps(self) -> bool:
        """Under a GradScaler (16-mixed) infinite gradients are the scaler's business: it skips the step itself and
        lowers the scale, so the guard neither skips nor counts them."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _nonfinite_events(self, opt: _Optimized) -> Tensor | None:
        """Where the guard counts ``opt``'s non-finite steps; None where the GradScaler does (16-mixed)."""
        if self._scaler_skips_steps():
            return None
        return self._events[f"nonfinite_{opt.name}"].on(self._loss.device)

    def _guard(self, opt: _Optimized, optimizer: torch.optim.Optimizer, nonfinite: Tensor) -> None:
        """Skips the step of a non-finite loss or gradient (``nonfinite`` 1.0), and checks the Q bound; all on the
        device.

        Fused Adam skips a step whose ``found_inf`` is set: parameters, moments and step count stay as they were
        (under bf16-mixed, whose Adam is not fused, the skip is decided on the host).
        A non-finite TD target makes the critic's loss non-finite, so it is caught here too. The actor's loss is
        -mean Q1(s, mu(s)), which the Q-bound alert reads. The flags are counted on the device (recorded with the
        step's loss by ``step_statistics``) and read at log points (``_read_events``), where too long a run of them
        stops training.
        """
        if not self._scaler_skips_steps():
            if optimizer.defaults["fused"]:
                optimizer.found_inf = nonfinite
            elif nonfinite:  # bf16-mixed: no fused Adam under AMP, so this one step is decided on the host
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None  # Adam skips parameters without a gradient: no step, no moment update
        if opt.name == "actor" and self._q_limit is not None:
            self._telemetry.record_q_bound(self._events["q_bound"].on(self._loss.device), self._loss, self._q_limit,
                                           self._env_step)

    def _read_events(self) -> list[str]:
        """Brings the device's event counts into the counters, with their warnings; returns the networks whose
        non-finite updates ran ``max_consecutive_nonfinite`` in a row (a run still going on at a read is carried
        into the next window, so a read between log points loses no stop)."""
        windows = read_events(self._events)
        counters, limit = self.counters, self.hparams.max_consecutive_nonfinite
        stop_reasons = []
        for name in ("critic", "actor"):
            window = windows[f"nonfinite_{name}"]
            counters.consecutive_nonfinite[name] = window.streak
            if window.longest >= limit:
                stop_reasons.append(f"{window.longest} consecutive non-finite {name} updates")
            if not window.count:
                continue
            counters.nonfinite_steps += window.count
            what = "gradient norm" if math.isfinite(window.first_value) else "loss"  # the recorded value: the loss
            rank_zero_warn(f"lit_td3: non-finite {name} {what} at env step {window.first_step}: {name} update "
                           f"skipped, parameters unchanged ({window.count} skipped by env step {counters.env_steps}, "
                           f"{window.streak} in a row now)")
        q = windows["q_bound"]
        counters.q_bound_alerts += q.count
        if q.count and not self._q_over:
            hp = self.hparams
            rank_zero_warn(
                f"lit_td3: Q-bound alert at env step {q.first_step}: the critic's mean Q1(s, mu(s)) is "
                f"{q.first_value:.4g}, beyond +-{self._q_limit:.4g} = {hp.q_bound_margin} x r_max / (1 - gamma) with "
                f"r_max={hp.reward_bound}, gamma={hp.gamma}: the critic's estimates are diverging (the actor loss "
                "is their negation)"
            )
        self._q_over = q.streak > 0
        return stop_reasons

    def alert_metrics(self) -> dict[str, float]:
        """The learner's running fault counts, logged at every log point as ``alerts/*`` (the env outputs rejected,
        ``alerts/nonfinite_env_outputs``, are the rollout stream's: ``RolloutDataModule.log_rollout_stats``)."""
        return {
            "alerts/nonfinite_steps": float(self.counters.nonfinite_steps),
            "alerts/q_bound": float(self.counters.q_bound_alerts),
        }

    # ------------------------------------------------------------------------------------------------ logging
    def _log_if_due(self) -> None:
        every = self.log_every_n_env_steps
        if self.counters.env_steps // every == self._logged_at // every:
            return
        self._logged_at = self.counters.env_steps
        stop_reasons = self._read_events()
        if stop_reasons:
            raise NonFiniteTrainingError(
                f"{stop_reasons[0]} (model.max_consecutive_nonfinite={self.hparams.max_consecutive_nonfinite}) by env "
                f"step {self.counters.env_steps}: stopping with a checkpoint of the last finite weights"
            )
        metrics = self.window.flush()
        metrics.update(self.alert_metrics())
        metrics["train/actor_updates"] = float(self.counters.actor_updates)
        log_scalars(self.trainer, metrics, self.counters.env_steps)

    def validation_step(self, episode: Any, batch_idx: int) -> None:
        self.log("eval/return", episode.episode_return, batch_size=1)
        self.log("eval/episode_length", float(episode.length), batch_size=1)

    # ------------------------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the run's counters and every RNG state; refuses (writing nothing) if any weight is NaN/inf."""
        bad = nonfinite_tensors(checkpoint)
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to write a checkpoint at env step {self.counters.env_steps}: non-finite values in "
                f"{bad[:5]}; the previous checkpoint holds the last finite state"
            )
        self._read_events()  # updates not counted at a log point yet; a stop is raised at the next log point
        mine = {
            "counters": asdict(self.counters),
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
        ranks = gather_from_ranks(self._trainer, mine)
        checkpoint.setdefault("lit_td3", {}).update({
            "counters": mine["counters"],  # rank 0's: env steps and updates are global, episodes and faults its own
            "logged_at": self._logged_at,
            "ranks": ranks,  # each rank's own counters and RNG states, in rank order
        })

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint of other shapes before anything is loaded; restores counters and RNG states.

        Training settings (learning rates, clipping, noise, gamma) are not compared: the configured ones apply.
        """
        saved = checkpoint.get("hyper_parameters", {})
        mismatched = [f"{key} {saved[key]} (this run: {self.hparams[key]})"
                      for key in ("observation_shapes", "action_dim", "network")
                      if key in saved and saved[key] != self.hparams[key]]
        if mismatched:
            raise ConfigError(
                f"checkpoint {str(self.trainer.ckpt_path)!r} does not fit this run's env and model: its "
                f"{'; its '.join(mismatched)}. A checkpoint loads only into the same observation shapes, action size "
                "and network sizes; training settings (learning rates, clipping, noise) may differ"
            )
        state = checkpoint["lit_td3"]
        self._logged_at = state["logged_at"]
        rank = min(self.trainer.global_rank, len(state["ranks"]) - 1)  # another world size: the data module refuses
        self.counters = RunCounters.from_state(state["ranks"][rank]["counters"])
        rng = state["ranks"][rank]["rng"]
        random.setstate(rng["python"])
        if "numpy" in rng:
            _set_numpy_rng_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Gives each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    Fused Adam walks a parameter and its state in memory order, so a state restored from a checkpoint of another
    layout (a CPU run's channels_last convolutions resumed on a GPU, or the reverse) would be updated element against
    the wrong element, silently.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def _count_replayed_step(optimizer: pl.core.optimizer.LightningOptimizer) -> None:
    """What ``LightningOptimizer.step`` does around a step for Lightning's count of optimizer steps (``global_step``),
    for a step replayed in a CUDA graph, where Lightning's Python does not run."""
    optimizer._on_before_step()
    optimizer._on_after_step()


def nonfinite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of the weights and optimizer-state tensors of a checkpoint dict that hold a NaN or inf."""
    named = list(checkpoint.get("state_dict", {}).items())
    for i, optimizer_state in enumerate(checkpoint.get("optimizer_states", [])):
        for param, state in optimizer_state.get("state", {}).items():
            named += [(f"optimizer {i} param {param} {key}", value) for key, value in state.items()]
    seen: set[tuple[str, int]] = set()  # a module registered under two names shares its tensors: report it once
    bad = []
    for name, t in named:
        if not isinstance(t, Tensor) or not t.is_floating_point() or (t.device.type, t.data_ptr()) in seen:
            continue
        seen.add((t.device.type, t.data_ptr()))
        if not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def _numpy_rng_state() -> dict[str, Any]:
    # The legacy global RNG's key is a uint32 ndarray, which torch.load(weights_only=True) refuses: store a tensor.
    state = np.random.get_state(legacy=False)
    state["state"] = {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}
    return state


def _set_numpy_rng_state(state: Mapping[str, Any]) -> None:
    inner = {**state["state"], "key": state["state"]["key"].numpy().astype(np.uint32)}
    np.random.set_state({**state, "state": inner})
