"""Env-steps/s of lit_td3 with 1 vs N asynchronous envs at a fixed replay ratio (GitHub issue "Performance", 2).

For each ``--num-envs`` value and each of ``--repeats`` rounds (the order flips every round), lit_td3 trains through
its real CLI (``TD3CLI``, configs/td3.yaml with checkpoints, evaluation and the progress bar left out) with
``data.num_envs`` envs in gymnasium's AsyncVectorEnv and ``data.replay_ratio`` updates per env step. The learning
phase after ``--learning-starts`` random steps and ``--warmup-steps`` untimed ones is timed by wall clock; env steps
are counted over all envs. The envs alone (random actions, no learner) are timed too: that is the ceiling.

The issue's target is for a 16-core GPU machine: 8 envs give >= 5x the env-steps/s of 1 env at replay ratio 1/8.
On a 2-core CPU the envs and the learner share two cores, and the ratio says little.

``--env-modes async,in-process`` also runs each env count with ``data.async_envs: false`` (the envs stepped in the
learner's process), in the same alternating rounds: the stage table's ``perf/env_step_ms`` then shows whether an
env steps slower in its worker process, beside the learner, than in the learner's own process.

    python benchmarks/env_scaling.py --device cuda                  # 1 vs 8 envs, replay ratio 1/8
    python benchmarks/env_scaling.py --quick                        # CPU smoke run
    python benchmarks/env_scaling.py --device cuda --num-envs 1,4,8,16 --lit-arg=--data.buffer_device=cuda
    python benchmarks/env_scaling.py --device cuda --num-envs 1 --replay-ratio 1 --env-modes async,in-process

The script reports; it asserts no target.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from common import (
    PIXEL_ENV,
    Summary,
    base_config,
    check_device,
    collect,
    log,
    machine_line,
    markdown_table,
    quiet,
    require_at_least,
    run_line,
    run_lit_td3,
    script_parser,
    stage_section,
)

from lit_td3.data import RolloutDataModule
from lit_td3.envs import check_env_id

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # CarRacing renders its observations with pygame, headless


ENV_MODES = {"async": True, "in-process": False}
"""``--env-modes`` names and their ``data.async_envs``."""


@dataclass(frozen=True)
class Variant:
    """One env count in one env mode."""

    num_envs: int
    mode: str

    @property
    def async_envs(self) -> bool:
        return ENV_MODES[self.mode]

    @property
    def label(self) -> str:
        return str(self.num_envs) if self.async_envs else f"{self.num_envs}, {self.mode}"


@dataclass
class Scaling:
    """Measurements of one variant, pooled over rounds."""

    env_steps_per_s: list[float] = field(default_factory=list)
    updates_per_s: list[float] = field(default_factory=list)
    env_only_per_s: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)  # lit_td3's perf/* stage times


def learning_round(variant: Variant, args: argparse.Namespace, result: Scaling) -> None:
    total, num_envs = args.learning_starts + args.warmup_steps + args.steps, variant.num_envs
    data = {"env_id": args.env_id, "num_envs": num_envs, "async_envs": variant.async_envs,
            "replay_ratio": args.replay_ratio, "total_env_steps": total, "learning_starts": args.learning_starts,
            "buffer_size": total + num_envs}
    run = run_lit_td3(device=args.device, data=data, window_start=args.learning_starts + args.warmup_steps,
                      extra_args=args.lit_arg)
    env_rate, update_rate, _ = run.window.rates()
    result.env_steps_per_s.append(env_rate)
    result.updates_per_s.append(update_rate)
    run.window.pool_stages(result.stages)
    del run
    collect()


def env_only_round(variant: Variant, args: argparse.Namespace, result: Scaling) -> None:
    """The same vector env as training (RolloutDataModule's), stepped with random actions and no learner."""
    data, num_envs = base_config()["data"], variant.num_envs
    dm = RolloutDataModule(env_id=args.env_id, num_envs=num_envs, async_envs=variant.async_envs, seed=data["seed"],
                           max_episode_steps=data["max_episode_steps"], frame_stack=data["frame_stack"],
                           image_size=data["image_size"])
    with quiet():
        dm.probe_spaces()
        envs = dm.training_envs()
    rng = np.random.default_rng(0)
    try:
        low, high = envs.single_action_space.low, envs.single_action_space.high

        def draw() -> np.ndarray:
            return rng.uniform(low, high, (num_envs, *low.shape)).astype(np.float32)

        for _ in range(3):  # the workers' first steps (imports, first render) are not timed
            envs.step(draw())
        start = time.perf_counter()
        for _ in range(args.env_only_steps):
            envs.step(draw())
        result.env_only_per_s.append(num_envs * args.env_only_steps / (time.perf_counter() - start))
    finally:
        dm.teardown("fit")


# ---------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-envs", default="1,8", help="comma-separated env counts; the first is the baseline")
    parser.add_argument("--replay-ratio", type=float, default=1 / 8, help="updates per env step (default 1/8)")
    parser.add_argument("--env-modes", default="async", help="comma-separated: async (worker processes, as shipped) "
                        "and/or in-process (data.async_envs false)")
    parser.add_argument("--env-id", default=PIXEL_ENV)
    parser.add_argument("--steps", type=int, help="timed learning-phase env steps per round, all envs together "
                        "(default 4000, --quick 160)")
    parser.add_argument("--learning-starts", type=int, help="random-action env steps (default 1000, --quick 300)")
    parser.add_argument("--warmup-steps", type=int, help="untimed learning-phase env steps (default 400, --quick 32)")
    parser.add_argument("--env-only-steps", type=int, help="timed vector steps of the envs alone, per env count and "
                        "round; 0 skips them (default 200, --quick 20)")
    parser.add_argument("--repeats", type=int, help="rounds (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads of the learner (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small budgets for a CPU smoke run")
    parser.add_argument("--lit-arg", action="append", default=[], metavar="ARG",
                        help="extra lit_td3 CLI argument, repeatable, e.g. --lit-arg=--data.buffer_device=cuda")
    args = parser.parse_args()
    defaults = {"steps": (4000, 160), "learning_starts": (1000, 300), "warmup_steps": (400, 32),
                "env_only_steps": (200, 20), "repeats": (3, 1)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        args.num_envs = [int(n) for n in args.num_envs.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--num-envs {args.num_envs}: expected comma-separated positive integers, e.g. 1,8")
    if not args.num_envs or min(args.num_envs) < 1:
        parser.error(f"--num-envs {args.num_envs}: expected comma-separated positive integers, e.g. 1,8")
    modes = [m.strip() for m in args.env_modes.split(",") if m.strip()]
    if not modes or set(modes) - set(ENV_MODES):
        parser.error(f"--env-modes {args.env_modes}: expected a comma-separated subset of {', '.join(ENV_MODES)}")
    args.variants = [Variant(n, mode) for n in args.num_envs for mode in modes]
    try:
        check_env_id(args.env_id)
    except ValueError as err:
        parser.error(f"--env-id {args.env_id}: {err}")
    if args.replay_ratio <= 0:
        parser.error(f"--replay-ratio {args.replay_ratio}: expected a positive number of updates per env step")
    require_at_least(parser, args, ("steps", "repeats", "threads"), 1)
    require_at_least(parser, args, ("warmup_steps", "env_only_steps"), 0)
    batch_size = base_config()["data"]["batch_size"]
    if args.learning_starts < batch_size:
        parser.error(f"--learning-starts {args.learning_starts}: expected at least the batch size {batch_size}")
    return args


def report(args: argparse.Namespace, results: dict[Variant, Scaling]) -> str:
    base = args.variants[0]
    base_rate = Summary.of(results[base].env_steps_per_s)
    rows = []
    for variant, result in results.items():
        rate = Summary.of(result.env_steps_per_s)
        env_only = Summary.of(result.env_only_per_s).text(1) if result.env_only_per_s else "not measured"
        rows.append([variant.label, rate.text(1), Summary.of(result.updates_per_s).text(1), env_only,
                     f"{rate.median / base_rate.median:.2f}×"])
    headers = ["num_envs", "learning-phase env-steps/s, median (min–max)", "updates/s",
               "envs alone (random actions), env-steps/s", f"vs num_envs={base.label}"]
    return markdown_table(headers, rows)


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {variant: Scaling() for variant in args.variants}
    for r in range(args.repeats):
        order = args.variants if r % 2 == 0 else args.variants[::-1]  # flips each round: drift hits all alike
        for variant in order:
            log(f"[env_scaling] round {r + 1}/{args.repeats}: {variant.num_envs} envs, {variant.mode}")
            if args.env_only_steps:
                env_only_round(variant, args, results[variant])
            learning_round(variant, args, results[variant])
    print(f"## Env scaling: {args.env_id}, replay ratio {args.replay_ratio:g}, {args.device}\n")
    print(f"{args.repeats} rounds of {args.steps:,} timed learning-phase env steps (after {args.learning_starts:,} "
          f"random + {args.warmup_steps:,} untimed); envs alone: {args.env_only_steps} timed vector steps.\n")
    print(report(args, results))
    print()
    print(stage_section({variant.label: result.stages for variant, result in results.items()}, "num_envs"))
    print(f"\nCommand: python benchmarks/env_scaling.py {' '.join(sys.argv[1:])}. {run_line(started)}")
    print(machine_line(args.device))


if __name__ == "__main__":
    main()
