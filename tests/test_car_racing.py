"""lit_td3/CarRacing-v3 is gymnasium's CarRacing-v3, frame for frame: only its renderer is faster."""

from __future__ import annotations

import hashlib
from typing import Any

import gymnasium as gym
import numpy as np
import pygame
import pytest
from gymnasium.envs.box2d.car_racing import CarRacing as StockCarRacing

from lit_td3.envs import CAR_RACING_ENV_ID, make_env
from lit_td3.envs.car_racing import CarRacing, renderer_verified

FONT_CLASS = pygame.font.Font


def window(env: gym.Env) -> str:
    """A digest of the full-size (1000x800) frame that the observation was scaled down from: a difference that the
    scaling averages away still shows here."""
    return hashlib.sha256(pygame.image.tobytes(env.unwrapped.surf, "RGB")).hexdigest()


def drive(env: gym.Env, seed: int, steps: int) -> list[tuple]:
    """Every (observation, reward, terminated, truncated, full-size frame digest) of ``steps`` steps with seeded
    random actions, over as many episodes as they take (each reset seeded ``seed + k``)."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    outputs, episode = [(obs, 0.0, False, False, window(env))], 0
    for _ in range(steps):
        # Mostly gas, so that the car leaves the start and visits (and recolors) road tiles.
        action = rng.uniform([-1.0, 0.3, 0.0], [1.0, 1.0, 0.2]).astype(np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        outputs.append((obs, reward, terminated, truncated, window(env)))
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
            outputs.append((obs, 0.0, False, False, window(env)))
    return outputs


def assert_same_outputs(stock: list[tuple], fast: list[tuple]) -> None:
    assert len(stock) == len(fast)
    for t, ((obs, *rest), (fast_obs, *fast_rest)) in enumerate(zip(stock, fast, strict=True)):
        assert rest == fast_rest, f"step {t}"
        assert np.array_equal(obs, fast_obs), f"step {t}: {np.count_nonzero(obs != fast_obs)} pixels differ"


@pytest.mark.parametrize(("seed", "kwargs"), [(0, {}), (7, {}), (3, {"domain_randomize": True})])
def test_frames_rewards_and_ends_equal_the_stock_env(seed: int, kwargs: dict) -> None:
    """Two episodes of 120 steps each (time limit), through the zoom-in of the first second, tile visits and a new
    track at the second reset: every pixel, reward and end flag is the stock env's."""
    stock = drive(gym.wrappers.TimeLimit(StockCarRacing(**kwargs), 120), seed, 240)
    fast = drive(gym.wrappers.TimeLimit(CarRacing(**kwargs), 120), seed, 240)
    assert sum(r > 0 for _, r, *_ in stock) > 5, "the car visited too few tiles to test their recoloring"
    assert sum(truncated for _, _, _, truncated, _ in stock) == 2
    assert_same_outputs(stock, fast)
    assert pygame.font.Font is FONT_CLASS, "the loaded font leaked out of CarRacing._render"


def test_registered_id_is_the_stock_spec_with_the_fast_renderer() -> None:
    spec, stock = gym.spec(CAR_RACING_ENV_ID), gym.spec("CarRacing-v3")
    assert (spec.max_episode_steps, spec.reward_threshold, spec.kwargs) == (
        stock.max_episode_steps, stock.reward_threshold, stock.kwargs)
    assert renderer_verified(), "the installed gymnasium's road code is not the one checked: CarRacing falls back"
    env = make_env(CAR_RACING_ENV_ID, seed=0)
    assert type(env.unwrapped) is CarRacing


def test_a_gymnasium_with_other_road_code_gets_its_own_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    stock_road = StockCarRacing._render_road

    def other_road_code(self: StockCarRacing, *args: Any) -> None:
        stock_road(self, *args)

    monkeypatch.setattr(StockCarRacing, "_render_road", other_road_code)
    renderer_verified.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not checked against: it runs gymnasium's own"):
            env = make_env(CAR_RACING_ENV_ID, seed=0)
        assert type(env.unwrapped) is StockCarRacing
    finally:
        renderer_verified.cache_clear()


def test_wrapped_observations_equal_the_stock_env() -> None:
    """Through lit_td3's pixel pipeline (grayscale, 84x84, 4-frame stack) and its episode seeding."""
    stock = drive(make_env("CarRacing-v3", seed=11, max_episode_steps=60), 11, 80)
    fast = drive(make_env(CAR_RACING_ENV_ID, seed=11, max_episode_steps=60), 11, 80)
    assert fast[1][0]["image"].shape == (4, 84, 84)
    assert_same_outputs([(o["image"], *r) for o, *r in stock], [(o["image"], *r) for o, *r in fast])


def test_a_new_env_renders_after_a_human_env_quit_pygame() -> None:
    """Closing a "human" env quits pygame, which invalidates every font loaded before: an env created afterwards
    must load its own (a font kept for the whole process raised "Invalid font" here)."""
    first = CarRacing(render_mode="human")
    first.reset(seed=0)
    first.step(np.zeros(3, np.float32))
    first.close()
    assert not pygame.get_init()
    assert_same_outputs(drive(StockCarRacing(), 5, 20), drive(CarRacing(), 5, 20))
