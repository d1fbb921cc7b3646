"""Tests of ``lit_td3.envs.carla`` against the in-process stand-in server (``tests/carla_standin.py``).

The env code under test is exactly what would run against a real server: only ``carla.Client`` is replaced, the
wheel's data types and map API stay real. Tests that need no simulator (settings, reward formulas, image
conversion) run without the wheel; the rest skip cleanly where ``carla`` is not installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import yaml

from lit_td3.envs.carla import (
    CarlaLaneKeepingEnv,
    ScenarioError,
    ServerNotRunningError,
    SimulatorUnavailableError,
    TrafficManagerPortError,
)
from lit_td3.envs.carla.config import WEATHER_PRESETS, RouteConfig
from lit_td3.envs.carla.reward import StepFacts, reward_terms, unweighted_terms
from lit_td3.envs.carla.route import Route, RouteTracker
from lit_td3.envs.carla.sensors import (
    FrameMatcher,
    SensorTimeoutError,
    bgra_to_rgb,
    to_gray_frame,
)
from lit_td3.envs.carla.server import free_port, port_accepts

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "carla_standin.py"
STAMP_ROW, STAMP_COL = 5, 42  # inside the stand-in camera's frame-stamp band after the resize to 84x84


# ------------------------------------------------------------------------------------------------- helpers
def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fast_kwargs(port: int, tm_port: int) -> dict[str, Any]:
    """Small time-outs and a short route, so that every fault costs a fraction of a second."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "tm_port": tm_port, "timeout_s": 0.3, "tick_timeout_s": 0.3,
                   "restart": {"attempts": 2, "backoff_s": 0.01}},
        "scenario": {"town": "Town01", "npc": {"count": 5}, "warmup_ticks": 2, "route": {"length_m": 200.0}},
        "sensors": {"timeout_s": 1.0},
        "max_episode_steps": 40,
    }


def keep_lane(obs: dict[str, np.ndarray]) -> np.ndarray:
    """A proportional driver on the observation vector: back to the centre line, about 6 m/s."""
    speed, lateral, heading = obs["vector"][:3]
    steer = np.clip(-0.3 * lateral - 1.0 * heading, -1, 1)
    return np.array([steer, 0.6 if speed < 6.0 else 0.0], dtype=np.float32)


def stamp(obs: dict[str, np.ndarray], index: int = -1) -> int:
    return int(obs["image"][index, STAMP_ROW, STAMP_COL])


def run_like_trainer(env: gym.Env, steps: int, policy: Callable = keep_lane,
                     before_step: Callable[[int], None] | None = None) -> SimpleNamespace:
    """The trainer's rule in miniature: a transition is stored unless ``info["discard_transition"]``."""
    stored, finals, discarded = [], [], []
    obs, _ = env.reset(seed=0)
    for t in range(steps):
        if before_step is not None:
            before_step(t)
        action = policy(obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        if info.get("discard_transition", False):
            discarded.append((next_obs, info))
        else:
            stored.append((obs, action, reward, next_obs, terminated))
        if terminated or truncated:
            finals.append(info)
            next_obs, _ = env.reset()
        obs = next_obs
    return SimpleNamespace(stored=stored, finals=finals, discarded=discarded)


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    carla = pytest.importorskip("carla")
    from tests import carla_standin

    registry = carla_standin.StandinRegistry()
    monkeypatch.setattr(carla, "Client", registry.client_class)
    yield registry
    registry.close()


@pytest.fixture
def sim(standin: Any) -> Iterator[SimpleNamespace]:
    """A stand-in server on a free port, and a factory of envs pointed at it (closed after the test)."""
    port, tm_port = free_port(), free_port()
    server = standin.add_server(port)
    envs: list[CarlaLaneKeepingEnv] = []

    def make(**overrides: Any) -> CarlaLaneKeepingEnv:
        env = CarlaLaneKeepingEnv(**merge(fast_kwargs(port, tm_port), overrides))
        envs.append(env)
        return env

    yield SimpleNamespace(registry=standin, server=server, port=port, tm_port=tm_port, make=make)
    for env in envs:
        env.close()


def assert_clean(server: Any) -> None:
    """What close() promises: no actors, asynchronous world and Traffic Manager, sensors stopped first."""
    assert server.actors == {}
    assert server.settings.synchronous_mode is False
    assert all(not tm.synchronous for tm in server.traffic_managers.values())
    assert server.violations == []


# ------------------------------------------------------------------------------------------------- without a server
def test_constructing_needs_no_server_and_no_carla_import() -> None:
    code = ("import sys; from lit_td3.envs.carla import CarlaLaneKeepingEnv as E; "
            "e = E(server={'port': 1}); print(e.observation_space, e.action_space); e.close(); e.close(); "
            "print('carla' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    spaces_line, imported = out.stdout.strip().splitlines()
    assert "'image': Box(0, 255, (4, 84, 84), uint8)" in spaces_line
    assert "'vector': Box(-inf, inf, (8,), float32)" in spaces_line
    assert "Box(-1.0, 1.0, (2,), float32)" in spaces_line
    assert imported == "False"


@pytest.mark.parametrize(("kwargs", "field", "shown"), [
    ({"reward": {"progress": {"weight": -1.0}}}, "data.env_kwargs.reward.progress.weight", "-1.0"),
    ({"reward": {"progres": {"weight": 1.0}}}, "data.env_kwargs.reward.progres", "{'weight': 1.0}"),
    ({"server": {"port": "2000"}}, "data.env_kwargs.server.port", "'2000'"),
    ({"server": {"tm_port_in_use": "steal"}}, "data.env_kwargs.server.tm_port_in_use", "'steal'"),
    ({"server": {"command": ["CarlaUE4.sh", "-carla-rpc-port={rpc}"]}}, "data.env_kwargs.server.command[1]",
     "'-carla-rpc-port={rpc}'"),
    ({"scenario": {"npc": {"count": True}}}, "data.env_kwargs.scenario.npc.count", "True"),
    ({"scenario": {"weather": "Sunny"}}, "data.env_kwargs.scenario.weather", "'Sunny'"),
    ({"scenario": {"fixed_delta_s": 0.5}}, "data.env_kwargs.scenario.fixed_delta_s", "0.5"),
    ({"sensors": {"timeout_s": float("nan")}}, "data.env_kwargs.sensors.timeout_s", "nan"),
    ({"termination": "yes"}, "data.env_kwargs.termination", "'yes'"),
    ({"max_episode_steps": 0}, "data.env_kwargs.max_episode_steps", "0"),
    ({"env_index": -1}, "env_index", "-1"),
    ({"env_index": 16000}, "data.env_kwargs.server.port", "2000"),
])
def test_bad_settings_name_field_and_value(kwargs: dict[str, Any], field: str, shown: str) -> None:
    with pytest.raises(ValueError) as caught:
        CarlaLaneKeepingEnv(**kwargs)
    assert str(caught.value).startswith(f"{field}={shown}: ")


def test_bad_settings_fail_before_any_connection(standin: Any) -> None:
    server = standin.add_server(free_port())
    with pytest.raises(ValueError, match=re.escape("data.env_kwargs.reward.speed.target_mps=0.0")):
        CarlaLaneKeepingEnv(server={"port": server.port}, reward={"speed": {"target_mps": 0}})
    assert server.rpc_calls == 0


def test_weather_presets_are_the_wheels() -> None:
    carla = pytest.importorskip("carla")
    wheel = sorted(n for n, v in vars(carla.WeatherParameters).items() if isinstance(v, carla.WeatherParameters))
    assert sorted(WEATHER_PRESETS) == wheel


def test_carla_yaml_is_a_valid_scenario() -> None:
    config = yaml.safe_load((REPO / "configs" / "carla.yaml").read_text())
    data = config["data"]
    assert data["env_id"] == "lit_td3/CarlaLaneKeeping-v0"
    env = CarlaLaneKeepingEnv(**data["env_kwargs"], max_episode_steps=data["max_episode_steps"])
    assert env.config.max_episode_steps == 500
    assert env.config.scenario.npc.count == 20
    assert env.config.scenario.fixed_delta_s == 0.05
    assert env.config.server.port == 2000
    assert env.observation_space["vector"].shape == (3 + env.config.scenario.route.lookahead_waypoints,)


# ------------------------------------------------------------------------------------------------- pure parts
def test_reward_terms_follow_their_formulas() -> None:
    from lit_td3.envs.carla.config import RewardConfig, build

    config = build(RewardConfig, {"progress": {"weight": 2.0}, "speed": {"target_mps": 10.0}}, "r")
    facts = StepFacts(progress_m=0.4, lateral_m=-0.875, lane_width_m=3.5, speed_mps=7.5, collision=True,
                      lane_invasion=False, steer=0.3, previous_steer=-0.1)
    raw = unweighted_terms(facts, config)
    assert raw == pytest.approx({"progress": 0.4, "lane_centre": 0.5, "speed": 0.75, "collision": -1.0,
                                 "lane_invasion": 0.0, "comfort": -0.2})
    weighted = reward_terms(facts, config)
    assert weighted["progress"] == pytest.approx(0.8)
    assert weighted["collision"] == pytest.approx(-config.collision.weight)
    off_lane = StepFacts(0.0, 5.0, 3.5, 25.0, False, True, 0.0, 0.0)
    assert unweighted_terms(off_lane, config)["lane_centre"] == 0.0
    assert unweighted_terms(off_lane, config)["speed"] == 0.0


def test_route_geometry_signs_and_distances() -> None:
    route = Route.from_points([(x, 0.0) for x in range(0, 31, 3)], [3.5] * 11)  # along +x, CARLA's y to the right
    tracker = RouteTracker(route, lookahead=3)
    right_of_line = tracker.locate(4.0, 0.5, math.radians(10))
    assert right_of_line.s == pytest.approx(4.0)
    assert right_of_line.lateral_m == pytest.approx(0.5)
    assert right_of_line.heading_error_rad == pytest.approx(math.radians(10))
    assert right_of_line.waypoint_distances_m == pytest.approx(
        [math.hypot(6 - 4, 0.5), math.hypot(9 - 4, 0.5), math.hypot(12 - 4, 0.5)])
    end = tracker.locate(40.0, -1.0, math.radians(350))
    assert end.s == pytest.approx(30.0)
    assert end.lateral_m == pytest.approx(-1.0)
    assert end.heading_error_rad == pytest.approx(math.radians(-10))
    assert end.waypoint_distances_m == pytest.approx([math.hypot(10, 1)] * 3)  # past the end: the last waypoint


def test_route_from_the_wheels_map_follows_the_lane() -> None:
    carla = pytest.importorskip("carla")
    from tests import carla_standin

    town = carla_standin.StandinMap("Carla/Maps/Town01")
    start = town.get_spawn_points()[0].location
    route = Route.from_map(town, start, RouteConfig(length_m=600.0, spacing_m=3.0))
    assert route.length_m == pytest.approx(600.0, abs=3.0)
    steps = np.diff(route.xy, axis=0)
    # 3 m along the road's reference line: a little more on the outer lane of a bend, as in CARLA
    assert np.linalg.norm(steps, axis=1) == pytest.approx(np.full(len(steps), 3.0), rel=0.05)
    for x, y in route.xy[::10]:  # every route point is a lane centre of the map
        waypoint = town.get_waypoint(carla.Location(x, y, 0))
        assert waypoint.transform.location.distance(carla.Location(x, y, 0)) < 0.05


def test_images_become_luma_frames_of_84_pixels() -> None:
    bgra = np.zeros((168, 168, 4), dtype=np.uint8)
    bgra[..., 2] = 255  # pure red in CARLA's BGRA order
    bgra[:, 84:, 2] = 0
    bgra[:, 84:, 1] = 255  # right half pure green
    rgb = bgra_to_rgb(bgra.tobytes(), 168, 168)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    frame = to_gray_frame(rgb)
    assert frame.shape == (84, 84) and frame.dtype == np.uint8
    assert frame[10, 10] == round(0.299 * 255) and frame[10, 70] == round(0.587 * 255)
    blocks = np.arange(84 * 84, dtype=np.float32).reshape(84, 84) % 251
    fine = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    assert np.array_equal(to_gray_frame(np.repeat(fine[..., None], 3, axis=2)), blocks.astype(np.uint8))


def test_frame_matcher_drops_stale_data_and_names_a_missing_frame() -> None:
    matcher = FrameMatcher("camera (sensor.camera.rgb)")
    for frame in (7, 8):
        matcher(SimpleNamespace(frame=frame))
    assert matcher.wait_for(8, timeout_s=0.1).frame == 8  # frame 7 was stale
    threading.Timer(0.05, matcher, [SimpleNamespace(frame=9)]).start()
    assert matcher.wait_for(9, timeout_s=1.0).frame == 9  # late but within the time-out
    with pytest.raises(SensorTimeoutError, match=r"sensor 'camera \(sensor.camera.rgb\)' .* frame 10 .* 0.05 s"):
        matcher.wait_for(10, timeout_s=0.05)


# ------------------------------------------------------------------------------------------------- episodes
def test_full_episode_is_well_formed(sim: SimpleNamespace) -> None:
    env = sim.make(scenario={"npc": {"min_distance_m": 60.0}})
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert all(stamp(obs, i) == stamp(obs) for i in range(4))  # the first frame, repeated
    assert stamp(obs) == _stamp_now(sim)
    assert info["route_length_m"] == pytest.approx(200.0, abs=3.0)
    totals: dict[str, float] = {}
    steps = 0
    while True:
        previous = obs
        obs, reward, terminated, truncated, info = env.step(keep_lane(obs))
        steps += 1
        assert env.observation_space.contains(obs)
        assert stamp(obs) == _stamp_now(sim)  # the image of this tick's frame, never an older one
        assert np.array_equal(obs["image"][:-1], previous["image"][1:])
        assert reward == pytest.approx(sum(info["reward_terms"].values()), abs=1e-12)
        assert set(info["reward_terms"]) == {"progress", "lane_centre", "speed", "collision", "lane_invasion",
                                             "comfort"}
        for name, value in info["reward_terms"].items():
            totals[name] = totals.get(name, 0.0) + value
        assert info["discard_transition"] is False
        if terminated or truncated:
            break
    assert (terminated, truncated, steps) == (False, True, 40)
    assert info["end_reason"] == "time_limit"
    assert info["collision"] == 0.0 and info["lane_invasion"] == 0.0
    assert 0.0 < info["route_completion"] < 1.0
    assert info["distance_m"] == pytest.approx(info["route_completion"] * 200.0, rel=0.1)
    for name, total in totals.items():
        assert info[f"reward/{name}"] == pytest.approx(total)
    shares = [info[f"reward_share/{name}"] for name in totals]
    assert sum(shares) == pytest.approx(1.0) and all(0.0 <= s <= 1.0 for s in shares)
    assert abs(obs["vector"][1]) < 0.3  # the driver kept to the lane centre
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(2, dtype=np.float32))


def _stamp_now(sim: SimpleNamespace) -> int:
    from tests import carla_standin

    return carla_standin.stamp_value(sim.server.frame)


def test_vector_reports_offset_heading_and_speed(sim: SimpleNamespace) -> None:
    env = sim.make(termination={"on_lane_invasion": False}, scenario={"npc": {"count": 0}})
    obs, _ = env.reset(seed=0)
    assert obs["vector"][:3] == pytest.approx([0.0, 0.0, 0.0], abs=1e-3)
    for _ in range(15):
        obs, *_ = env.step(np.array([0.0, 1.0], dtype=np.float32))
    speed = obs["vector"][0]
    assert speed > 2.0
    for _ in range(12):
        obs, *_ = env.step(np.array([0.5, 0.0], dtype=np.float32))  # steer right: offset and heading turn positive
    _, lateral, heading = obs["vector"][:3]
    assert lateral > 0.1 and heading > 0.05
    ego = next(v for v in sim.server.vehicles() if v.attributes["role_name"] == "lit_td3/env0")
    assert obs["vector"][0] == pytest.approx(ego._speed, rel=1e-4)


def test_env_index_offsets_the_ports(standin: Any) -> None:
    port, tm_port = free_port(), free_port()
    server = standin.add_server(port + 4 * 3)
    env = gym.make("lit_td3/CarlaLaneKeeping-v0", **merge(fast_kwargs(port, tm_port), {"env_index": 3}))
    try:
        env.reset(seed=0)
        assert list(server.traffic_managers) == [tm_port + 4 * 3]
        assert {v.attributes["role_name"] for v in server.vehicles()} == {"lit_td3/env3"}
    finally:
        env.close()


def test_totals_survive_a_time_limit_wrapper(sim: SimpleNamespace) -> None:
    kwargs = fast_kwargs(sim.port, sim.tm_port)
    del kwargs["max_episode_steps"]  # gymnasium.make keeps this name for itself: a TimeLimit wrapper
    env = gym.make("lit_td3/CarlaLaneKeeping-v0", max_episode_steps=7, **kwargs)
    try:
        obs, _ = env.reset(seed=0)
        total_progress = 0.0
        for step in range(1, 8):
            obs, _, terminated, truncated, info = env.step(keep_lane(obs))
            total_progress += info["reward_terms"]["progress"]
        assert (step, terminated, truncated) == (7, False, True)
        assert info["reward/progress"] == pytest.approx(total_progress) and total_progress > 0
        assert sum(info[f"reward_share/{t}"] for t in info["reward_terms"]) == pytest.approx(1.0)
    finally:
        env.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_collision_terminates_when_configured(sim: SimpleNamespace, enabled: bool) -> None:
    env = sim.make(termination={"on_collision": enabled}, max_episode_steps=10)
    env.reset(seed=0)
    sim.server.inject_collision(3)
    for step in range(1, 11):
        _, _, terminated, truncated, info = env.step(np.array([0.0, 0.3], dtype=np.float32))
        if step == 3:
            assert info["reward_terms"]["collision"] == -100.0
            assert info["collision"] == 1.0
        if terminated or truncated:
            break
    assert info["collision"] == 1.0
    if enabled:
        assert (step, terminated, truncated, info["end_reason"]) == (3, True, False, "collision")
    else:
        assert (step, terminated, truncated, info["end_reason"]) == (10, False, True, "time_limit")
    assert info["reward/collision"] == -100.0


@pytest.mark.parametrize("enabled", [True, False])
def test_lane_invasion_terminates_when_configured(sim: SimpleNamespace, enabled: bool) -> None:
    env = sim.make(termination={"on_lane_invasion": enabled}, scenario={"npc": {"count": 0}}, max_episode_steps=80)
    env.reset(seed=0)
    invaded_at = None
    for step in range(1, 81):
        action = np.array([0.5, 0.8], dtype=np.float32)  # drive off to the right
        _, _, terminated, truncated, info = env.step(action)
        if invaded_at is None and info["lane_invasion"] == 1.0:
            invaded_at = step
            assert info["reward_terms"]["lane_invasion"] == -50.0
        if terminated or truncated:
            break
    assert invaded_at is not None
    if enabled:
        assert (step, terminated, info["end_reason"]) == (invaded_at, True, "lane_invasion")
    else:
        assert (step, truncated, info["end_reason"]) == (80, True, "time_limit")


def test_route_end_terminates_with_full_completion(sim: SimpleNamespace) -> None:
    env = sim.make(scenario={"route": {"length_m": 15.0}, "npc": {"count": 0}}, max_episode_steps=200)
    obs, _ = env.reset(seed=0)
    for _ in range(200):
        obs, _, terminated, truncated, info = env.step(keep_lane(obs))
        if terminated or truncated:
            break
    assert terminated and info["end_reason"] == "route_complete"
    assert info["route_completion"] == 1.0


# ------------------------------------------------------------------------------------------------- faults
def assert_fault_step(step: tuple[Any, ...], needle: str) -> None:
    obs, reward, terminated, truncated, info = step
    assert (reward, terminated, truncated) == (0.0, False, True)
    assert info["discard_transition"] is True and info["end_reason"] == "fault"
    assert needle in info["fault"]
    assert not obs["image"].any() and not obs["vector"].any()  # the null observation, not a stale frame


@pytest.mark.parametrize("fault", ["tick_timeout", "camera_missing"])
def test_fault_mid_episode_truncates_discards_and_recovers(sim: SimpleNamespace, fault: str) -> None:
    env = sim.make(max_episode_steps=10)

    def arm(t: int) -> None:
        if t == 0:
            sim.server.fail_tick(5) if fault == "tick_timeout" else sim.server.camera_fault(5, "missing")

    run = run_like_trainer(env, steps=20, before_step=arm)
    assert len(run.discarded) == 1 and len(run.stored) == 19
    obs, info = run.discarded[0]
    assert_fault_step((obs, 0.0, False, True, info), "time-out" if fault == "tick_timeout" else "camera")
    if fault == "camera_missing":
        assert re.search(r"no data for frame \d+", info["fault"])
    assert [f["end_reason"] for f in run.finals] == ["fault", "time_limit"]
    for _, _, _, next_obs, _ in run.stored:  # every stored transition is a real one
        assert next_obs["image"].any()
    # the episode after the fault runs on a rebuilt world: only its own actors, synchronous again
    roles = {a.attributes.get("role_name") for a in sim.server.actors.values()}
    assert roles == {"lit_td3/env0"} and sim.server.settings.synchronous_mode
    assert len(sim.server.vehicles()) == 1 + 5 and len(sim.server.sensors()) == 3
    assert sim.server.violations == []


@pytest.mark.parametrize("mode", ["late", "stale"])
def test_late_or_stale_camera_data_still_gives_the_right_frame(sim: SimpleNamespace, mode: str) -> None:
    env = sim.make()
    env.reset(seed=0)
    sim.server.camera_fault(2, mode, delay_s=0.1)
    for _ in range(3):
        obs, _, _, truncated, info = env.step(np.array([0.0, 0.2], dtype=np.float32))
        assert not info["discard_transition"] and not truncated
        assert stamp(obs) == _stamp_now(sim)


def test_server_gone_then_back_reconnects_and_rebuilds(sim: SimpleNamespace) -> None:
    env = sim.make(server={"restart": {"attempts": 5, "backoff_s": 0.2, "backoff_factor": 1.0}})
    env.reset(seed=0)
    sim.server.kill_at_tick(2)
    env.step(np.zeros(2, dtype=np.float32))
    assert_fault_step(env.step(np.zeros(2, dtype=np.float32)), "time-out")
    timer = threading.Timer(0.5, sim.server.revive)  # comes back while reset() is retrying
    timer.start()
    obs, _ = env.reset()
    timer.join()
    assert env.observation_space.contains(obs) and stamp(obs) == _stamp_now(sim)
    assert sim.server.incarnation == 1  # a fresh server, set up from scratch
    assert sim.server.settings.synchronous_mode and sim.server.settings.fixed_delta_seconds == 0.05
    assert len(sim.server.vehicles()) == 6
    _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
    assert info["discard_transition"] is False


def test_spent_budget_raises_naming_host_and_port(sim: SimpleNamespace) -> None:
    env = sim.make()
    env.reset(seed=0)
    sim.server.kill()
    assert_fault_step(env.step(np.zeros(2, dtype=np.float32)), "time-out")
    with pytest.raises(SimulatorUnavailableError) as caught:
        env.reset()
    message = str(caught.value)
    assert f"127.0.0.1:{sim.port}" in message and "2 recovery attempts failed" in message
    rebuilt = type(caught.value)(message)  # what AsyncVectorEnv does with a worker's error
    assert isinstance(rebuilt, SimulatorUnavailableError) and str(rebuilt) == message


def test_no_server_at_start_is_a_clear_error_without_retries(standin: Any) -> None:
    port = free_port()
    env = CarlaLaneKeepingEnv(**merge(fast_kwargs(port, free_port()), {"server": {"timeout_s": 0.2}}))
    started = time.monotonic()
    with pytest.raises(ServerNotRunningError) as caught:
        env.reset()
    assert time.monotonic() - started < 2.0  # one time-out, no retry loop (a guard, not a benchmark)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert f"CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port}" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_traffic_manager_port_in_use_picks_a_free_one(sim: SimpleNamespace) -> None:
    with socket.socket() as squatter:
        squatter.bind(("", sim.tm_port))
        squatter.listen(1)
        env = sim.make()
        env.reset(seed=0)
        (tm_port,) = sim.server.traffic_managers
        assert tm_port != sim.tm_port
        npcs = [v for v in sim.server.vehicles() if v.autopilot_port is not None]
        assert len(npcs) == 5 and {v.autopilot_port for v in npcs} == {tm_port}


def test_traffic_manager_port_in_use_fails_fast_when_asked(sim: SimpleNamespace) -> None:
    with socket.socket() as squatter:
        squatter.bind(("", sim.tm_port))
        squatter.listen(1)
        env = sim.make(server={"tm_port_in_use": "fail"})
        with pytest.raises(TrafficManagerPortError, match=f"Traffic Manager port {sim.tm_port} is in use"):
            env.reset(seed=0)
    assert_clean(sim.server)


@pytest.mark.parametrize(("scenario", "needle"), [
    ({"town": "Town99"}, "data.env_kwargs.scenario.town='Town99' is not on the server; it has ['Town01', "),
    ({"spawn_point": 10_000}, "data.env_kwargs.scenario.spawn_point=10000: Town01 has "),
    ({"ego_blueprint": "vehicle.flying.carpet"},
     "data.env_kwargs.scenario.ego_blueprint='vehicle.flying.carpet' is not in the server's blueprint library"),
    ({"npc": {"blueprint_filter": "vehicle.bh.*"}},
     "data.env_kwargs.scenario.npc.blueprint_filter='vehicle.bh.*' matches no four-wheeled vehicle"),
])
def test_scenario_the_server_cannot_play_fails_without_retries(sim: SimpleNamespace, scenario: dict[str, Any],
                                                               needle: str) -> None:
    env = sim.make(scenario=scenario)
    with pytest.raises(ScenarioError) as caught:
        env.reset(seed=0)
    assert needle in str(caught.value)
    assert sim.registry.clients_created == 1  # no reconnection: a scenario error is not retried
    assert sim.server.actors == {}
    assert sim.server.settings.synchronous_mode is False


def test_render_returns_the_camera_image(sim: SimpleNamespace) -> None:
    env = sim.make(render_mode="rgb_array", sensors={"camera": {"width": 200, "height": 100}})
    env.reset(seed=0)
    image = env.render()
    assert image is not None and image.shape == (100, 200, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [_stamp_now(sim)] * 3


# ------------------------------------------------------------------------------------------------- cleanup
def test_close_leaves_the_server_clean_and_is_idempotent(sim: SimpleNamespace) -> None:
    env = sim.make()
    env.reset(seed=0)
    env.reset(seed=1)  # between episodes: the old actors go in one batch, sensors first
    for _ in range(5):
        env.step(np.array([0.0, 0.5], dtype=np.float32))
    live = dict(sim.server.actors)
    batches_before = len(sim.server.destroy_batches)
    env.close()
    assert_clean(sim.server)
    (last_batch,) = sim.server.destroy_batches[batches_before:]
    assert sorted(i for i, _ in last_batch) == sorted(live)
    kinds = [type_id.startswith("sensor.") for _, type_id in last_batch]
    assert kinds == sorted(kinds, reverse=True)  # every sensor ahead of every vehicle
    env.close()
    assert len(sim.server.destroy_batches) == batches_before + 1
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


def test_close_after_the_server_died_returns(sim: SimpleNamespace) -> None:
    env = sim.make()
    env.reset(seed=0)
    sim.server.kill()
    calls = sim.server.rpc_calls
    env.close()  # nothing to clean on a dead server; it gives up after the first time-out
    assert sim.server.rpc_calls - calls == 1


def test_leftovers_of_a_killed_run_are_removed(sim: SimpleNamespace) -> None:
    import carla

    world = carla.Client("127.0.0.1", sim.port).get_world()
    library = world.get_blueprint_library()
    leftover = library.find("vehicle.audi.a2")
    leftover.set_attribute("role_name", "lit_td3/env0")
    far = carla.Transform(carla.Location(100.0, -81.75, 0.3), carla.Rotation(yaw=180))
    car = world.spawn_actor(leftover, far)
    world.spawn_actor(library.find("sensor.camera.rgb"), carla.Transform(), attach_to=car)
    foreign = library.find("vehicle.nissan.micra")
    foreign.set_attribute("role_name", "hero")
    theirs = world.spawn_actor(foreign, carla.Transform(carla.Location(50.0, -81.75, 0.3), carla.Rotation(yaw=180)))
    env = sim.make(scenario={"town": "Town10HD_Opt", "npc": {"count": 0}})  # no town change: actors stay
    env.reset(seed=0)
    assert car.id not in sim.server.actors
    assert theirs.id in sim.server.actors
    assert len(sim.server.sensors()) == 3


def test_vector_env_autoreset_carries_the_discard_flag(sim: SimpleNamespace) -> None:
    envs = gym.vector.SyncVectorEnv([sim.make], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    sim.server.fail_tick(2)
    envs.step(np.zeros((1, 2), dtype=np.float32))
    obs, reward, terminated, truncated, infos = envs.step(np.zeros((1, 2), dtype=np.float32))
    assert truncated[0] and not terminated[0] and reward[0] == 0.0
    assert infos["final_info"]["discard_transition"][0]
    assert not infos["final_obs"][0]["image"].any()
    assert stamp({"image": obs["image"][0]}) == _stamp_now(sim)  # the next episode's real first observation
    envs.close()
    assert_clean(sim.server)


# ------------------------------------------------------------------------------------------------- restarts
def _pids(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _wait_port_closed(port: int) -> None:
    deadline = time.monotonic() + 10
    while port_accepts("127.0.0.1", port, 0.1) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_server_command_is_started_and_restarted(standin: Any, tmp_path: Path) -> None:
    port = free_port()
    server = standin.add_server(port, requires_listener=True)
    pidfile = tmp_path / "pids"
    command = [sys.executable, str(STANDIN), "--listen", "{port}", "--pidfile", str(pidfile)]
    env = CarlaLaneKeepingEnv(**merge(fast_kwargs(port, free_port()), {"server": {
        "command": command, "startup_timeout_s": 30.0, "log_dir": str(tmp_path)}}))
    try:
        env.reset(seed=0)
        (first,) = _pids(pidfile)
        env.step(np.zeros(2, dtype=np.float32))
        os.kill(int(first), signal.SIGKILL)  # the server crashes
        _wait_port_closed(port)
        assert_fault_step(env.step(np.zeros(2, dtype=np.float32)), "time-out")
        obs, _ = env.reset()
        first_again, second = _pids(pidfile)
        assert first_again == first and second != first
        assert env.observation_space.contains(obs) and server.incarnation == 1
        assert (tmp_path / f"carla_server_{port}.log").exists()
    finally:
        env.close()
    _wait_port_closed(port)
    assert not port_accepts("127.0.0.1", port, 0.1)  # stop_on_close: the env stopped the server it started


def test_failing_restarts_spend_the_budget(standin: Any, tmp_path: Path) -> None:
    port = free_port()
    standin.add_server(port, requires_listener=True)
    pidfile, broken = tmp_path / "pids", tmp_path / "broken"
    command = [sys.executable, str(STANDIN), "--listen", "{port}", "--pidfile", str(pidfile),
               "--fail-if-exists", str(broken)]
    env = CarlaLaneKeepingEnv(**merge(fast_kwargs(port, free_port()), {"server": {
        "command": command, "startup_timeout_s": 30.0, "log_dir": str(tmp_path),
        "restart": {"attempts": 3, "backoff_s": 0.01}}}))
    try:
        env.reset(seed=0)
        broken.touch()
        os.kill(int(_pids(pidfile)[0]), signal.SIGKILL)
        _wait_port_closed(port)
        assert_fault_step(env.step(np.zeros(2, dtype=np.float32)), "time-out")
        with pytest.raises(SimulatorUnavailableError, match=f"127.0.0.1:{port} is unavailable: 3 recovery"):
            env.reset()
        assert _pids(pidfile)[1:] == ["failed"] * 3  # one start per attempt
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------- signals
SIGNAL_SCRIPT = """
import atexit, faulthandler, json, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a hang is, should one happen
# Ctrl+C as at a terminal: a background launcher (CI under nohup, `cmd &`) passes SIGINT down ignored, and Python
# then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[:0] = [{repo!r}, {tests!r}]
import carla, carla_standin
registry = carla_standin.StandinRegistry()
server = registry.add_server({port})
carla.Client = registry.client_class

def report():
    with open({report!r}, "w") as f:
        json.dump({{"actors": len(server.actors), "sync": server.settings.synchronous_mode,
                   "tm_sync": [tm.synchronous for tm in server.traffic_managers.values()],
                   "violations": server.violations}}, f)

atexit.register(report)  # before the env's own hook, so it runs after it
from lit_td3.envs.carla import CarlaLaneKeepingEnv
env = CarlaLaneKeepingEnv(**{kwargs!r})
env.reset(seed=0)
print("ready", flush=True)
while True:
    *_, terminated, truncated, _ = env.step([0.0, 0.2])
    if terminated or truncated:
        env.reset()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_leave_the_server_clean(tmp_path: Path, signum: int) -> None:
    pytest.importorskip("carla")
    port, report = free_port(), tmp_path / "report.json"
    kwargs = merge(fast_kwargs(port, free_port()), {"max_episode_steps": 500})
    script = SIGNAL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), port=port, report=str(report),
                                  kwargs=kwargs)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(0.2)  # mid-episode
    proc.send_signal(signum)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        pytest.fail(f"still running 30 s after signal {signum}; its threads then:\n{proc.communicate()[1][-8000:]}")
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
    else:
        assert proc.returncode != 0
    state = json.loads(report.read_text())
    assert state == {"actors": 0, "sync": False, "tm_sync": [False], "violations": []}


def test_sigterm_during_close_waits_for_the_cleanup(sim: SimpleNamespace) -> None:
    from lit_td3.envs.carla import env as env_module

    env = sim.make()
    env.reset(seed=0)
    stop_sensors = env._session._stop_sensors  # the first cleanup step: SIGTERM arrives in the middle of it

    def interrupted() -> None:
        env_module._exit_on_sigterm(signal.SIGTERM, None)
        stop_sensors()

    env._session._stop_sensors = interrupted
    with pytest.raises(SystemExit) as caught:
        env.close()
    assert caught.value.code == 128 + signal.SIGTERM  # exits after the cleanup, not in the middle of it
    assert_clean(sim.server)


WORKER_SCRIPT = """
import json, os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import gymnasium as gym
from lit_td3.envs.carla import CarlaLaneKeepingEnv

class ReportOnClose(gym.Wrapper):
    def __init__(self, env, server):
        super().__init__(env)
        self.server = server
    def close(self):
        try:
            super().close()
        finally:
            s = self.server
            with open({report!r}, "w") as f:
                json.dump({{"actors": len(s.actors), "sync": s.settings.synchronous_mode,
                           "tm_sync": [tm.synchronous for tm in s.traffic_managers.values()]}}, f)

def make():
    import carla, carla_standin
    registry = carla_standin.StandinRegistry()
    server = registry.add_server({port})
    carla.Client = registry.client_class
    return ReportOnClose(CarlaLaneKeepingEnv(**{kwargs!r}), server)

signal.signal(signal.SIGTERM, lambda *_: None)  # like Lightning's handler: inherited by the forked worker
envs = gym.vector.AsyncVectorEnv([make], context="fork")
envs.reset(seed=0)
envs.step([[0.0, 0.2]])
worker = envs.processes[0]
os.kill(worker.pid, signal.SIGTERM)
worker.join(30)
print(json.dumps({{"exitcode": worker.exitcode}}), flush=True)
os._exit(0)
"""


def test_sigterm_to_a_vector_env_worker_closes_its_env(tmp_path: Path) -> None:
    pytest.importorskip("carla")
    port, report = free_port(), tmp_path / "report.json"
    script = WORKER_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), port=port, report=str(report),
                                  kwargs=fast_kwargs(port, free_port()))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=90,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"exitcode": 128 + signal.SIGTERM}
    assert json.loads(report.read_text()) == {"actors": 0, "sync": False, "tm_sync": [False]}
