"""Gymnasium wrappers that give every env lit_td3's observation and action conventions.

Observations become a dict with ``image`` (uint8 frame stack, S×H×W) and/or ``vector`` (float32); actions become the
box [-1, 1]^A whatever the env's own bounds. This module never imports torch or Lightning: it also runs inside
gymnasium's vector-env worker processes.
"""

from __future__ import annotations

import time
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

DISCARD_KEY = "discard_transition"
"""An env sets ``info[DISCARD_KEY] = True`` on a step that produced no real transition (simulator fault, non-finite
output): the episode ends as truncated and the stream writes nothing for that step."""


class DictObservation(gym.ObservationWrapper):
    """Wraps a Box observation as ``{key: obs}`` so networks and buffer see one shape of data."""

    def __init__(self, env: gym.Env, key: str) -> None:
        super().__init__(env)
        self.key = key
        box = env.observation_space
        if key == "vector":
            box = spaces.Box(box.low.astype(np.float32), box.high.astype(np.float32), dtype=np.float32)
        self.observation_space = spaces.Dict({key: box})

    def observation(self, observation: Any) -> dict[str, np.ndarray]:
        if self.key == "vector":
            observation = np.asarray(observation, dtype=np.float32)
        return {self.key: observation}


NONFINITE_KEY = "nonfinite_env_output"
"""``info[NONFINITE_KEY] = 1.0`` on a step that ``RejectNonFinite`` discarded; the stream counts and reports it."""
NONFINITE_FIELDS_KEY = "nonfinite_fields"
"""Which outputs of that step were NaN/inf, e.g. ``"reward, observation 'vector'"`` (for the report)."""


class RejectNonFinite(gym.Wrapper):
    """Ends the episode (truncated, transition discarded) when the env returns a NaN/inf observation or reward.

    A single non-finite value written to the replay buffer would poison every critic target that samples it. The
    reward is checked as the float32 the buffer stores: a finite float64 beyond 3.4e38 would become inf there.
    """

    RESET_ATTEMPTS = 3

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        with np.errstate(over="ignore"):
            bad = [] if np.isfinite(np.float32(reward)) else ["reward"]
        bad += [f"observation {k!r}" for k, v in obs.items() if not np.isfinite(v).all()]
        if not bad:
            return obs, reward, terminated, truncated, info
        info = {**info, DISCARD_KEY: True, NONFINITE_KEY: 1.0, NONFINITE_FIELDS_KEY: ", ".join(bad)}
        return obs, 0.0, False, True, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        # A reset observation has no step to discard: reset again (the env's RNG moves on), a few times at most.
        for _ in range(self.RESET_ATTEMPTS):
            obs, info = self.env.reset(seed=seed, options=options)
            if all(np.isfinite(v).all() for v in obs.values()):
                return obs, info
            seed = None
        raise RuntimeError(f"{self.env}: {self.RESET_ATTEMPTS} resets in a row returned a NaN/inf observation")


class SeedEachEpisode(gym.Wrapper):
    """Resets episode k with seed ``base_seed + k``, so trajectories are a function of the episode index alone.

    That is what makes a resumed run follow the same episodes as an uninterrupted one: the env's internal state cannot
    be checkpointed, but its episode index can.
    """

    def __init__(self, env: gym.Env, base_seed: int, first_episode: int = 0) -> None:
        super().__init__(env)
        self.base_seed = base_seed
        self.episode = first_episode

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=self.base_seed + self.episode if seed is None else seed, options=options)
        self.episode += 1
        return obs, info


STEP_TIME_KEY = "env_step_s"
"""``info[STEP_TIME_KEY]``: the seconds a step took where the env runs (its worker process under async envs), every
wrapper included; the stream logs its mean as ``perf/env_step_ms``."""


class TimeStep(gym.Wrapper):
    """Times each step inside the env's own process. The learner's ``perf/env_ms`` is its wait for the step, which
    async envs shorten by the work the learner overlaps with it; the step's own time shows what the env costs."""

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        start = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, STEP_TIME_KEY: time.perf_counter() - start}


LUMINANCE = (0.2125, 0.7154, 0.0721)
"""The weights of R, G and B in gymnasium's ``GrayscaleObservation``."""


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """gymnasium's ``GrayscaleObservation(keep_dim=False)``, bit for bit, in about a fifth of its time: the same float64
    products, added in the same order, truncated to uint8 the same way. Its ``np.sum`` over the 3-long channel axis
    was the slow part (0.3 ms of a 96×96 CarRacing frame, about 6% of an env step)."""
    channels = rgb.astype(np.float64)
    red, green, blue = LUMINANCE
    return (channels[..., 0] * red + channels[..., 1] * green + channels[..., 2] * blue).astype(np.uint8)


def pixel_pipeline(env: gym.Env, frame_stack: int, image_size: int) -> gym.Env:
    """RGB H×W×3 → grayscale → image_size² → stack of ``frame_stack`` frames (first frame repeated at reset)."""
    gray = spaces.Box(0, 255, env.observation_space.shape[:2], np.uint8)
    env = gym.wrappers.TransformObservation(env, grayscale, gray)
    env = gym.wrappers.ResizeObservation(env, (image_size, image_size))
    env = gym.wrappers.FrameStackObservation(env, frame_stack, padding_type="reset")
    return DictObservation(env, "image")


def conform(env: gym.Env, frame_stack: int, image_size: int) -> gym.Env:
    """Applies the observation and action conventions above to any gymnasium env, or says why it cannot."""
    obs_space, act_space = env.observation_space, env.action_space
    env_id = env.spec.id if env.spec else type(env.unwrapped).__name__
    if not isinstance(act_space, spaces.Box):
        # A ValueError, not a TypeError: it is a bad config value, which the CLI reports as bad input (exit 2).
        raise ValueError(  # noqa: TRY004
            f"data.env_id={env_id!r}: TD3 needs a continuous (Box) action space, got {act_space}")
    if isinstance(obs_space, spaces.Dict):
        unknown = set(obs_space.spaces) - {"image", "vector"}
        if unknown:
            raise ValueError(f"data.env_id={env_id!r}: dict observation keys {sorted(unknown)} are not 'image'/'vector'")
    elif isinstance(obs_space, spaces.Box) and obs_space.dtype == np.uint8 and obs_space.shape[2:] == (3,):
        env = pixel_pipeline(env, frame_stack, image_size)
    elif isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1:
        env = DictObservation(env, "vector")
    else:
        raise ValueError(
            f"data.env_id={env_id!r}: observation space {obs_space} is neither an RGB image (uint8 H×W×3), "
            "a flat vector, nor a dict of 'image'/'vector'"
        )
    if not (np.all(act_space.low == -1.0) and np.all(act_space.high == 1.0)):
        # CarRacing's gas/brake live in [0, 1]: the actor's tanh range is mapped onto the env's own bounds.
        env = gym.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    return RejectNonFinite(env)
