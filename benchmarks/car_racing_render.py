"""Steps/s of gymnasium's CarRacing-v3 and of lit_td3/CarRacing-v3 (the same frames, rendered faster), side by side.

Each round times ``--steps`` steps of each env, in alternating order, in this process: one env, seeded random actions
(mostly gas), built by ``lit_td3.envs.make_env`` as the learner gets it (grayscale, 84x84, 4-frame stack, episodes
of ``--episode-steps``, resets included). Before timing, the first steps of both envs are compared frame by frame, as
tests/test_car_racing.py does at length. The ratio is of the medians.

Then the pixel pipeline's grayscale alone, on 200 of the env's RGB frames: gymnasium's ``GrayscaleObservation`` and
lit_td3's (``lit_td3.envs.wrappers.grayscale``, the same uint8 for every color: tests/test_wrappers.py), checked equal
on those frames, then timed in alternating rounds.

    python benchmarks/car_racing_render.py             # 5 rounds of 1,000 steps each
    python benchmarks/car_racing_render.py --quick     # 3 rounds of 200

The script reports; it asserts no target.
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import numpy as np
from common import Summary, log, machine_line, markdown_table, run_line

from lit_td3.envs import CAR_RACING_ENV_ID, make_env
from lit_td3.envs.wrappers import grayscale

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # CarRacing renders its observations with pygame, headless
ENV_IDS = ("CarRacing-v3", CAR_RACING_ENV_ID)


def steps_per_s(env_id: str, steps: int, episode_steps: int, seed: int) -> float:
    env = make_env(env_id, seed=seed, max_episode_steps=episode_steps)
    # In the wrapped env's [-1, 1] units: any steering, mostly gas, little brake.
    actions = np.random.default_rng(seed).uniform([-1, -0.4, -1], [1, 1, -0.6], (steps, 3)).astype(np.float32)
    env.reset()
    started = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - started
    env.close()
    return steps / elapsed


def check_same_frames(steps: int, seed: int) -> None:
    """Stops the benchmark if the two envs' observations ever differ in the first ``steps`` steps."""
    stock, fast = (make_env(env_id, seed=seed) for env_id in ENV_IDS)
    observations = [stock.reset()[0]["image"], fast.reset()[0]["image"]]
    for t in range(steps):
        if not np.array_equal(*observations):
            raise SystemExit(f"step {t}: {ENV_IDS[1]} rendered a different frame than {ENV_IDS[0]}")
        observations = [env.step(np.array([0.0, 1.0, -1.0], np.float32))[0]["image"] for env in (stock, fast)]


def rgb_frames(count: int, seed: int) -> list[np.ndarray]:
    """The 96x96 RGB observations of ``count`` steps of the env before lit_td3's pixel pipeline."""
    env = gym.make(CAR_RACING_ENV_ID)
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).uniform([-1, 0.0, 0.0], [1, 1, 0.2], (count, 3)).astype(np.float32)
    frames = [env.step(action)[0] for action in actions]
    env.close()
    return frames


def grayscale_us(frames: list[np.ndarray], repeats: int) -> dict[str, Summary]:
    """Microseconds per frame of gymnasium's grayscale and lit_td3's, in alternating rounds over ``frames``."""
    # gymnasium's conversion is its wrapper's observation method: the wrapper needs an env, never stepped here.
    with gym.wrappers.GrayscaleObservation(gym.make(CAR_RACING_ENV_ID), keep_dim=False) as wrapper:
        converters = {"gymnasium GrayscaleObservation": wrapper.observation, "lit_td3 grayscale": grayscale}
        if not all(np.array_equal(wrapper.observation(frame), grayscale(frame)) for frame in frames):
            raise SystemExit("lit_td3's grayscale differs from gymnasium's on the env's frames")
        times: dict[str, list[float]] = {name: [] for name in converters}
        for r in range(repeats):
            for name in converters if r % 2 == 0 else list(converters)[::-1]:
                start = time.perf_counter()
                for frame in frames:
                    converters[name](frame)
                times[name].append((time.perf_counter() - start) / len(frames) * 1e6)
    return {name: Summary.of(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 200 steps")
    parser.add_argument("--repeats", type=int, help="rounds (default 5, --quick 3)")
    parser.add_argument("--steps", type=int, help="timed steps per env and round (default 1000, --quick 200)")
    parser.add_argument("--episode-steps", type=int, default=1000, help="time limit of an episode (default 1000)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    steps = args.steps or (200 if args.quick else 1000)
    for name, value in (("repeats", repeats), ("steps", steps), ("episode-steps", args.episode_steps)):
        if value < 1:
            parser.error(f"--{name} {value}: expected at least 1")
    started = time.perf_counter()
    log("[car_racing_render] comparing frames")
    check_same_frames(100, seed=0)
    rates: dict[str, list[float]] = {env_id: [] for env_id in ENV_IDS}
    for r in range(repeats):
        for env_id in ENV_IDS if r % 2 == 0 else ENV_IDS[::-1]:  # flips each round: drift hits both alike
            log(f"[car_racing_render] round {r + 1}/{repeats}: {env_id}")
            rates[env_id].append(steps_per_s(env_id, steps, args.episode_steps, seed=r))
    stock, fast = (Summary.of(rates[env_id]) for env_id in ENV_IDS)
    print("## CarRacing-v3 steps/s: gymnasium's renderer vs lit_td3's\n")
    print(f"One env in this process, {steps} steps per round, {repeats} rounds, episodes of {args.episode_steps} "
          "steps; median (min–max). The first 100 frames of both were compared: identical.\n")
    print(markdown_table(["env", "steps/s", "ms/step"],
                         [(env_id, s.text(), f"{1e3 / s.median:.2f}") for env_id, s in zip(ENV_IDS, (stock, fast))]))
    print(f"\nRatio of medians: **{fast.median / stock.median:.2f}×**\n")
    gray = grayscale_us(rgb_frames(200, seed=0), repeats=max(repeats, 5))
    print("## The pixel pipeline's grayscale, µs per 96×96 frame\n")
    print(f"200 of the env's RGB frames, {max(repeats, 5)} alternating rounds; identical outputs on every frame.\n")
    print(markdown_table(["grayscale", "µs per frame"], [(name, g.text()) for name, g in gray.items()]))
    stock_us, lit_us = (g.median for g in gray.values())
    saved_ms = (stock_us - lit_us) / 1e3
    print(f"\nRatio of medians: **{stock_us / lit_us:.2f}×**: {saved_ms:.3f} ms less per env step, "
          f"{saved_ms * fast.median / 1e3:.1%} of {ENV_IDS[1]}'s median step above (which has lit_td3's grayscale)\n")
    print(machine_line("cpu"))
    print(run_line(started))


if __name__ == "__main__":
    main()
