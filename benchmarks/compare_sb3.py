"""lit_td3 against Stable-Baselines3 TD3: same hyperparameters, same networks, same envs, one process, alternating.

GitHub issue "Performance", section 4. For each observation path (``pixel``: lit_td3/CarRacing-v3 (gymnasium's
CarRacing-v3, the same frames rendered faster; ``--pixel-env CarRacing-v3`` for gymnasium's own) as 4x84x84 grayscale
stacks, NatureCNN encoders, [256, 256] heads; ``state``: Pendulum-v1, [400, 300] MLPs) and each of ``--repeats``
rounds, both libraries train from scratch one after the other (the order flips every round):

1. ``--learning-starts`` env steps of uniform random actions fill the buffer (not timed);
2. ``--warmup-steps`` learning-phase env steps warm caches and allocators (not timed);
3. ``--steps`` learning-phase env steps are timed by wall clock: env-steps/s at one update per env step
   (train_freq=1, gradient_steps=1 in SB3; replay_ratio 1 in lit_td3);
4. on the filled buffer, single updates are timed (critic + 1/2 actor, synchronized on CUDA), and so is drawing
   one batch onto the device.

lit_td3 runs through its real CLI (``TD3CLI``, configs/td3.yaml with checkpoints, evaluation and the progress bar
left out, gradient alerts kept); SB3 runs ``TD3.learn`` with the same TD3 hyperparameters read from that file. Both
step the env built by ``lit_td3.envs.make_env`` (SB3 gets its observation array without the dict). What could not
be made equal is printed under the table. The script reports; it asserts no target.

    python benchmarks/compare_sb3.py --quick                  # CPU, under 10 minutes on 2 cores
    python benchmarks/compare_sb3.py --device cuda            # the GPU comparison of the issue
    python benchmarks/compare_sb3.py --device cuda --paths pixel --lit-arg=--data.buffer_device=cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from common import (
    PIXEL_ENV,
    STATE_ENV,
    STATE_HIDDEN_SIZES,
    Summary,
    buffer_sampler,
    check_device,
    collect,
    lit_hyperparameters,
    log,
    machine_line,
    markdown_table,
    per_update_ms,
    quiet,
    require_at_least,
    run_line,
    run_lit_td3,
    script_parser,
    stage_section,
    synchronize,
    time_lit_sampling,
    time_updates,
    timed_callback_instances,
    timed_ms,
)

from lit_td3.envs import check_env_id, make_env

try:
    from stable_baselines3 import TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise
except ImportError as err:  # the bench extra is optional for the library itself
    raise SystemExit("compare_sb3.py needs Stable-Baselines3: pip install -e '.[bench]'") from err

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # CarRacing renders its observations with pygame, headless


@dataclass(frozen=True)
class Budget:
    """Env steps and timed updates of one round of one path."""

    learning_starts: int
    warmup_steps: int
    steps: int
    update_groups: int
    update_warmup: int = 4

    @property
    def total(self) -> int:
        return self.learning_starts + self.warmup_steps + self.steps


BUDGETS = {
    # (path, quick): sized so that --quick finishes on 2 CPU cores in minutes and the full run on a GPU in ~10.
    ("pixel", False): Budget(learning_starts=1000, warmup_steps=200, steps=2000, update_groups=100),
    ("state", False): Budget(learning_starts=1000, warmup_steps=500, steps=5000, update_groups=200),
    ("pixel", True): Budget(learning_starts=300, warmup_steps=4, steps=20, update_groups=4, update_warmup=2),
    ("state", True): Budget(learning_starts=300, warmup_steps=200, steps=800, update_groups=50),
}


@dataclass
class Results:
    """Per-framework measurements of one path, pooled over rounds."""

    env_steps_per_s: list[float] = field(default_factory=list)
    updates_per_s: list[float] = field(default_factory=list)
    update_ms: list[float] = field(default_factory=list)
    sample_ms: list[float] = field(default_factory=list)
    parameters: tuple[int, int] = (0, 0)
    stages: dict[str, list[float]] = field(default_factory=dict)  # lit_td3's perf/* stage times


# ---------------------------------------------------------------------------------------------------- the envs
class ObservationKey(gym.ObservationWrapper):
    """lit_td3's dict observation ``{key: array}`` as the bare array SB3's CnnPolicy/MlpPolicy take."""

    def __init__(self, env: gym.Env, key: str) -> None:
        super().__init__(env)
        if not isinstance(env.observation_space, gym.spaces.Dict):
            raise TypeError(f"expected lit_td3's dict observations, got {env.observation_space}")
        self.key = key
        self.observation_space = env.observation_space[key]

    def observation(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return observation[self.key]


def path_settings(path: str, pixel_env: str) -> tuple[str, str, dict[str, Any]]:
    """(env id, observation key, lit_td3 model overlay) of a path."""
    if path == "pixel":
        return pixel_env, "image", {}
    return STATE_ENV, "vector", {"network": {"hidden_sizes": STATE_HIDDEN_SIZES}}


def episode_limit(path: str) -> int | None:
    # The pixel path keeps configs/td3.yaml's episode limit; Pendulum keeps its own (200 steps) in both libraries.
    return lit_hyperparameters()["max_episode_steps"] if path == "pixel" else None


# ---------------------------------------------------------------------------------------------------- lit_td3
def lit_round(path: str, pixel_env: str, budget: Budget, device: str, extra_args: list[str],
              results: Results) -> None:
    env_id, _, model = path_settings(path, pixel_env)
    data = {"env_id": env_id, "num_envs": 1, "replay_ratio": 1.0, "total_env_steps": budget.total,
            "learning_starts": budget.learning_starts, "buffer_size": budget.total,
            "max_episode_steps": episode_limit(path)}
    run = run_lit_td3(device=device, data=data, model=model, extra_args=extra_args,
                      window_start=budget.learning_starts + budget.warmup_steps)
    env_rate, update_rate, _ = run.window.rates()
    results.env_steps_per_s.append(env_rate)
    results.updates_per_s.append(update_rate)
    run.window.pool_stages(results.stages)
    batch_size = run.module.trainer.datamodule.batch_size
    timer = time_updates(run.module, buffer_sampler(run.buffer, batch_size), device=device,
                         iterations=budget.update_groups * run.policy_freq,
                         warmup=budget.update_warmup * run.policy_freq, callbacks=timed_callback_instances(),
                         pin_memory=device == "cuda" and run.buffer.device.type == "cpu")
    results.update_ms += per_update_ms(timer.seconds, run.policy_freq)
    results.sample_ms += time_lit_sampling(run.buffer, batch_size, device, repeats=4 * budget.update_groups)
    results.parameters = (count(run.module.actor), count(run.module.critic))
    del run, timer
    collect()


# ---------------------------------------------------------------------------------------------------- SB3
class SB3Window(BaseCallback):
    """The learning-phase window of an SB3 run, stamped after env steps (``_on_step``) and at the end of ``learn``."""

    def __init__(self, start: int, device: str) -> None:
        super().__init__()
        self.start, self.device = start, device
        self.opened: tuple[float, int, int] | None = None
        self.closed: tuple[float, int, int] | None = None

    def _stamp(self) -> tuple[float, int, int]:
        synchronize(self.device)
        return time.perf_counter(), self.model.num_timesteps, self.model._n_updates

    def _on_step(self) -> bool:
        if self.opened is None and self.num_timesteps >= self.start:
            self.opened = self._stamp()
        return True

    def _on_training_end(self) -> None:
        self.closed = self._stamp()

    def rates(self) -> tuple[float, float]:
        if self.opened is None or self.closed is None or self.closed[1] <= self.opened[1]:
            raise RuntimeError("the SB3 timed window saw no env steps: more --steps?")
        seconds = self.closed[0] - self.opened[0]
        return (self.closed[1] - self.opened[1]) / seconds, (self.closed[2] - self.opened[2]) / seconds


def sb3_model(path: str, pixel_env: str, budget: Budget, device: str, seed: int) -> TD3:
    hp = lit_hyperparameters()
    env_id, key, _ = path_settings(path, pixel_env)
    env = ObservationKey(make_env(env_id, seed=seed, max_episode_steps=episode_limit(path),
                                  frame_stack=hp["frame_stack"], image_size=hp["image_size"]), key)
    action_dim = int(np.prod(env.action_space.shape or ()))
    if path == "pixel":
        policy = "CnnPolicy"
        # SB3's NatureCNN has lit_td3's default channels (32, 64, 64); only its feature width is a knob.
        policy_kwargs = {"net_arch": list(hp["network"]["hidden_sizes"]), "share_features_extractor": False,
                         "normalize_images": True,
                         "features_extractor_kwargs": {"features_dim": hp["network"]["cnn_features"]}}
    else:
        policy, policy_kwargs = "MlpPolicy", {"net_arch": list(STATE_HIDDEN_SIZES)}
    noise = NormalActionNoise(np.zeros(action_dim), hp["exploration_noise"] * np.ones(action_dim))
    return TD3(policy, env, learning_rate=hp["learning_rate"], buffer_size=budget.total,
               learning_starts=budget.learning_starts, batch_size=hp["batch_size"], tau=hp["tau"], gamma=hp["gamma"],
               train_freq=1, gradient_steps=1, action_noise=noise, optimize_memory_usage=False,
               policy_delay=hp["policy_delay"], target_policy_noise=hp["target_policy_noise"],
               target_noise_clip=hp["target_noise_clip"], policy_kwargs=policy_kwargs, verbose=0, seed=seed,
               device=device)


def sb3_round(path: str, pixel_env: str, budget: Budget, device: str, results: Results) -> None:
    model = sb3_model(path, pixel_env, budget, device, seed=42)
    window = SB3Window(budget.learning_starts + budget.warmup_steps, device)
    with quiet():
        model.learn(total_timesteps=budget.total, callback=window)
    env_rate, update_rate = window.rates()
    results.env_steps_per_s.append(env_rate)
    results.updates_per_s.append(update_rate)
    results.update_ms += time_sb3_updates(model, budget, device)
    results.sample_ms += time_sb3_sampling(model, device, repeats=4 * budget.update_groups)
    results.parameters = (count(model.actor), count(model.critic))
    if model.env is not None:
        model.env.close()
    del model
    collect()


def time_sb3_updates(model: TD3, budget: Budget, device: str) -> list[float]:
    """``model.train(gradient_steps=1)`` as ``learn`` calls it after every env step (it samples inside)."""
    seconds = []
    for i in range((budget.update_warmup + budget.update_groups) * model.policy_delay):
        synchronize(device)
        start = time.perf_counter()
        model.train(gradient_steps=1, batch_size=model.batch_size)
        synchronize(device)
        if i >= budget.update_warmup * model.policy_delay:
            seconds.append(time.perf_counter() - start)
    return per_update_ms(seconds, model.policy_delay)


def time_sb3_sampling(model: TD3, device: str, repeats: int) -> list[float]:
    if model.replay_buffer is None:
        raise RuntimeError("the SB3 model has no replay buffer: learn() did not run")
    buffer = model.replay_buffer
    return timed_ms(lambda: buffer.sample(model.batch_size, env=model._vec_normalize_env), device, repeats, warmup=0)


def count(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


# ---------------------------------------------------------------------------------------------------- report
def report(path: str, pixel_env: str, budget: Budget, repeats: int, lit: Results, sb3: Results) -> str:
    env_id = path_settings(path, pixel_env)[0]
    lit_rate, sb3_rate = Summary.of(lit.env_steps_per_s), Summary.of(sb3.env_steps_per_s)
    lit_upd, sb3_upd = Summary.of(lit.update_ms), Summary.of(sb3.update_ms)
    lit_smp, sb3_smp = Summary.of(lit.sample_ms), Summary.of(sb3.sample_ms)
    rows = [
        ["learning-phase env-steps/s (median of rounds, min–max)", lit_rate.text(1), sb3_rate.text(1),
         f"{lit_rate.median / sb3_rate.median:.2f}×"],
        ["learning-phase updates/s", Summary.of(lit.updates_per_s).text(1), Summary.of(sb3.updates_per_s).text(1),
         ""],
        ["one update, ms (critic + ½ actor; SB3's includes its sampling)", lit_upd.text(2), sb3_upd.text(2),
         f"{sb3_upd.median / lit_upd.median:.2f}×"],
        ["one batch sampled onto the device, ms", lit_smp.text(3), sb3_smp.text(3),
         f"{sb3_smp.median / lit_smp.median:.2f}×"],
    ]
    title = (f"### {path}: {env_id}, batch {lit_hyperparameters()['batch_size']}, {repeats} rounds of "
             f"{budget.steps:,} timed learning-phase env steps (after {budget.learning_starts:,} random + "
             f"{budget.warmup_steps:,} untimed), {budget.update_groups * lit_hyperparameters()['policy_delay']} timed "
             "updates per round")
    parameters = (f"Parameters: lit_td3 actor {lit.parameters[0]:,} / critic {lit.parameters[1]:,}; "
                  f"SB3 actor {sb3.parameters[0]:,} / critic {sb3.parameters[1]:,}"
                  + (" (equal)" if lit.parameters == sb3.parameters else " (DIFFERENT: the comparison is off)"))
    return "\n".join([title, "", markdown_table(["measure", "lit_td3", "SB3", "speed-up (lit_td3 vs SB3)"], rows),
                      "", parameters, "", stage_section({path: lit.stages}, "path"), ""])


def rounds_table(path: str, lit: Results, sb3: Results) -> str:
    rows = [[path, i + 1, f"{a:.1f}", f"{b:.1f}"] for i, (a, b) in
            enumerate(zip(lit.env_steps_per_s, sb3.env_steps_per_s))]
    return markdown_table(["path", "round", "lit_td3 env-steps/s", "SB3 env-steps/s"], rows)


DIFFERENCES = """Differences that remain (by design or not removable):
- Env stepping: SB3 steps its env in the learner's process (DummyVecEnv), so env and update run one after the other;
  lit_td3 steps it in a worker process (gymnasium AsyncVectorEnv) while the learner updates. This is the design
  under test (with --lit-arg=--data.async_envs=false lit_td3 steps it in-process too, and only a GPU learner's
  asynchronous kernels overlap it).
- Replay: SB3 stores full obs and next_obs stacks (optimize_memory_usage=False); lit_td3 stores each frame once and
  rebuilds stacks by index. SB3's update time includes its sampling (its train() samples); lit_td3's does not (the
  stream samples while the env steps), hence the separate sampling row.
- Actor step: SB3 backpropagates the actor loss into the critic's weights too (the gradients are discarded);
  lit_td3 freezes the critic for it (toggled_optimizer). SB3 reads the critic loss with .item() every update.
- lit_td3 adds gradient clipping, per-part gradient telemetry, the non-finite guard and gradient alerts, and logs to
  TensorBoard every model.log_every_n_env_steps; SB3 clips nothing and logs nowhere (verbose=0, no tensorboard_log).
- Learning rates: SB3 has one (set to lit_td3's critic_mlp_lr); lit_td3 has one per part. No effect on speed."""


# ---------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both learners run")
    parser.add_argument("--quick", action="store_true",
                        help="small budgets: the whole script in under 10 minutes on 2 CPU cores")
    parser.add_argument("--repeats", type=int, help="rounds per path (default 3, --quick 2)")
    parser.add_argument("--steps", type=int, help="timed learning-phase env steps per round (default per path)")
    parser.add_argument("--learning-starts", type=int, help="random-action env steps before learning (>= batch)")
    parser.add_argument("--warmup-steps", type=int, help="untimed learning-phase env steps before the window")
    parser.add_argument("--update-iterations", type=int, help="timed updates per round (default per path)")
    parser.add_argument("--paths", default="pixel,state", help="comma-separated: pixel (CarRacing-v3), state "
                        "(Pendulum-v1)")
    parser.add_argument("--pixel-env", default=PIXEL_ENV, help=f"the pixel path's env, for both libraries (default "
                        f"{PIXEL_ENV}; CarRacing-v3 is gymnasium's own renderer, same frames, slower)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both learners (default: torch's)")
    parser.add_argument("--lit-arg", action="append", default=[], metavar="ARG",
                        help="extra lit_td3 CLI argument, repeatable, e.g. --lit-arg=--model.compile=true")
    args = parser.parse_args()
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    try:
        check_env_id(args.pixel_env)
    except ValueError as err:
        parser.error(f"--pixel-env: {err}")
    bad = [p for p in args.paths if p not in ("pixel", "state")]
    if bad or not args.paths:
        parser.error(f"--paths {','.join(args.paths)}: expected a comma-separated subset of pixel,state")
    require_at_least(parser, args, ("repeats", "steps", "update_iterations", "threads"), 1)
    require_at_least(parser, args, ("learning_starts", "warmup_steps"), 0)
    if args.learning_starts is not None and args.learning_starts < lit_hyperparameters()["batch_size"]:
        parser.error(f"--learning-starts {args.learning_starts}: expected at least the batch size "
                     f"{lit_hyperparameters()['batch_size']} (the first update samples a full batch)")
    return args


def budget_for(path: str, args: argparse.Namespace) -> Budget:
    budget = BUDGETS[(path, args.quick)]
    overrides = {"learning_starts": args.learning_starts, "warmup_steps": args.warmup_steps, "steps": args.steps,
                 "update_groups": None if args.update_iterations is None
                 else max(1, args.update_iterations // lit_hyperparameters()["policy_delay"])}
    return replace(budget, **{k: v for k, v in overrides.items() if v is not None})


def check_networks() -> None:
    hp = lit_hyperparameters()
    if list(hp["network"]["cnn_channels"]) != [32, 64, 64]:
        raise SystemExit(f"configs/td3.yaml has model.network.cnn_channels={hp['network']['cnn_channels']}; SB3's "
                         "NatureCNN is fixed at [32, 64, 64], so the networks would differ")


def main() -> None:
    args = parse_args()
    check_device(args.device)
    check_networks()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    started = time.perf_counter()
    sections, rounds = [], []
    for path in args.paths:
        budget = budget_for(path, args)
        lit, sb3 = Results(), Results()
        for r in range(repeats):
            order = ["lit", "sb3"] if r % 2 == 0 else ["sb3", "lit"]  # flips each round: drift hits both alike
            for framework in order:
                log(f"[compare_sb3] {path} round {r + 1}/{repeats}: {framework}")
                if framework == "lit":
                    lit_round(path, args.pixel_env, budget, args.device, args.lit_arg, lit)
                else:
                    sb3_round(path, args.pixel_env, budget, args.device, sb3)
        sections.append(report(path, args.pixel_env, budget, repeats, lit, sb3))
        rounds.append(rounds_table(path, lit, sb3))
    print(f"## lit_td3 vs Stable-Baselines3 TD3 ({args.device})\n")
    print("\n".join(sections))
    print("Per round:\n")
    print("\n\n".join(rounds))
    print()
    print(DIFFERENCES)
    print()
    extra = f" lit_td3 extra args: {' '.join(args.lit_arg)}." if args.lit_arg else ""
    print(f"Command: python benchmarks/compare_sb3.py {' '.join(sys.argv[1:])}.{extra} {run_line(started)}")
    print(machine_line(args.device))


if __name__ == "__main__":
    main()
