"""lit_td3's env conventions: what ``conform`` accepts and refuses, and its grayscale being gymnasium's."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from lit_td3.envs.wrappers import conform, grayscale


class Still(gym.Env):
    """An env of the given spaces that only ever returns a zero observation."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[Any, dict]:
        return self.observation_space.sample() * 0, {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.reset()[0], 0.0, False, False, {}


def image_space(channels: int) -> gym.spaces.Box:
    return gym.spaces.Box(0, 255, (96, 96, channels), np.uint8)


def test_grayscale_equals_gymnasiums_for_every_color() -> None:
    """All 2^24 RGB colors, 65,536 at a time (one red value each)."""
    stock = gym.wrappers.GrayscaleObservation(Still(image_space(3), gym.spaces.Box(-1, 1, (1,))), keep_dim=False)
    green, blue = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    for red in range(256):
        colors = np.stack([np.full_like(green, red), green, blue], axis=-1)
        ours = grayscale(colors)
        assert ours.dtype == np.uint8
        assert np.array_equal(ours, stock.observation(colors)), f"red={red}"


def test_pixel_observations_become_a_uint8_frame_stack() -> None:
    env = conform(Still(image_space(3), gym.spaces.Box(-1, 1, (2,))), frame_stack=3, image_size=42)
    obs, _ = env.reset()
    assert env.observation_space["image"].shape == obs["image"].shape == (3, 42, 42)
    assert obs["image"].dtype == np.uint8


@pytest.mark.parametrize("channels", [1, 4])
def test_an_image_that_is_not_rgb_is_refused_by_name(channels: int) -> None:
    with pytest.raises(ValueError, match=r"data.env_id='Still'.*is neither an RGB image \(uint8 H×W×3\)"):
        conform(Still(image_space(channels), gym.spaces.Box(-1, 1, (2,))), frame_stack=4, image_size=84)


def test_a_discrete_action_space_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"data.env_id='Still': TD3 needs a continuous \(Box\) action space"):
        conform(Still(image_space(3), gym.spaces.Discrete(3)), frame_stack=4, image_size=84)
