"""The env factory: any registered gymnasium id (or ``module:id``, whose module registers it), made to lit_td3's
conventions (see ``wrappers``).

Two ids are registered here, neither importing its simulator until an env is made: CARLA's (the env imports the
``carla`` client when it connects) and ``lit_td3/CarRacing-v3``, gymnasium's CarRacing-v3 with the same frames
rendered faster (see ``car_racing``), the default env.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import gymnasium as gym

from lit_td3.envs.wrappers import (
    DISCARD_KEY,
    STEP_TIME_KEY,
    SeedEachEpisode,
    TimeStep,
    conform,
)

CARLA_ENV_ID = "lit_td3/CarlaLaneKeeping-v0"
CAR_RACING_ENV_ID = "lit_td3/CarRacing-v3"

if CARLA_ENV_ID not in gym.registry:
    gym.register(id=CARLA_ENV_ID, entry_point="lit_td3.envs.carla:CarlaLaneKeepingEnv",
                 kwargs={"env_index": 0, "max_episode_steps": 500})


def _register_car_racing() -> None:
    """``lit_td3/CarRacing-v3`` with gymnasium's own kwargs, time limit and reward threshold for CarRacing-v3."""
    stock = gym.spec("CarRacing-v3")
    gym.register(id=CAR_RACING_ENV_ID, entry_point="lit_td3.envs.car_racing:make", kwargs=stock.kwargs,
                 max_episode_steps=stock.max_episode_steps, reward_threshold=stock.reward_threshold)


if CAR_RACING_ENV_ID not in gym.registry:
    _register_car_racing()

__all__ = ["CARLA_ENV_ID", "CAR_RACING_ENV_ID", "DISCARD_KEY", "STEP_TIME_KEY", "check_env_id", "make_env"]


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``; ``"module:id"`` imports ``module`` first, as ``gymnasium.make`` does, so
    that an env registered by the user's own package exists in every process that builds one (env workers, DDP
    ranks)."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"data.env_id={env_id!r}: module {module!r} cannot be imported ({err}); the part "
                             "before ':' must be an importable module that registers the env") from None
    return gym.spec(name)


def check_env_id(env_id: str) -> None:
    """Fails with gymnasium's own suggestion ("Did you mean ...") for an unknown id, without building the env."""
    try:
        env_spec(env_id)
    except gym.error.Error as err:
        raise ValueError(f"data.env_id={env_id!r} is not a registered gymnasium env: {err}") from None


def make_env(
    env_id: str,
    env_kwargs: Mapping[str, Any] | None = None,
    *,
    seed: int,
    env_index: int = 0,
    first_episode: int = 0,
    max_episode_steps: int | None = None,
    frame_stack: int = 4,
    image_size: int = 84,
) -> gym.Env:
    """Builds one env: observations as dicts, actions in [-1, 1], episode k seeded with ``seed + k``, each step's own
    time in its ``info`` (``STEP_TIME_KEY``).

    ``env_index`` is the env's global index over all ranks and vector slots; envs that take it (CARLA: its ports are
    offset by it) receive it, others never see it.
    """
    spec = env_spec(env_id)
    kwargs = dict(env_kwargs or {})
    if "env_index" in spec.kwargs:
        kwargs["env_index"] = env_index
    if max_episode_steps is not None and "max_episode_steps" in spec.kwargs:
        # An env that keeps its own time limit (CARLA) gets ours too, besides gymnasium's TimeLimit wrapper.
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "max_episode_steps": max_episode_steps})
    env = conform(gym.make(spec, max_episode_steps=max_episode_steps, **kwargs), frame_stack, image_size)
    return TimeStep(SeedEachEpisode(env, base_seed=seed, first_episode=first_episode))
