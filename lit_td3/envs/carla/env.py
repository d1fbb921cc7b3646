"""``CarlaLaneKeepingEnv``: lane keeping in CARLA 0.9.16 as a gymnasium env, with simulator faults made harmless.

Observation ``{"image": uint8 4×84×84, "vector": float32 K}`` (K = 3 + ``scenario.route.lookahead_waypoints``):

- ``image``: the last 4 grayscale front-camera frames, oldest first (the first frame repeated at an episode's start).
- ``vector[0]``: forward speed of the ego (m/s; negative when rolling backwards).
- ``vector[1]``: lateral offset from the centre of the route's lane (m), positive to the right.
- ``vector[2]``: heading error, ego yaw minus the route's direction (rad, in [-pi, pi)), positive to the right.
- ``vector[3:]``: distances from the ego to the next route waypoints (m), nearest first.

Action ``[steer, pedal]`` in [-1, 1]: ``steer`` is CARLA's steering command; ``pedal > 0`` is throttle and
``pedal < 0`` is brake.

Episodes end terminated on a collision or lane invasion (each configurable) or at the route's end, truncated after
``max_episode_steps``. Every step's ``info`` holds ``reward_terms`` (the weighted terms that sum to the reward),
``collision`` and ``lane_invasion`` (1.0 once one happened this episode), ``route_completion`` (0..1),
``distance_m`` (metres driven), ``reward/<term>`` (episode totals so far) and ``reward_share/<term>``; the last step
adds ``end_reason``. Being in every step, they are complete even when a ``TimeLimit`` wrapper ends the episode.

Faults: a tick, RPC or sensor time-out mid-episode ends the episode as truncated with
``info["discard_transition"] = True`` and an all-zero observation that must not be stored; the next ``reset``
reconnects (restarting the server when ``server.command`` is set) and rebuilds the world, within the restart budget.
When that is spent, ``reset`` raises ``SimulatorUnavailableError`` naming host and port.

The constructor validates everything and never touches the network; ``carla`` is imported on the first ``reset``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from types import FrameType, ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_td3.config import ConfigError
from lit_td3.envs.carla.config import ROOT, CarlaEnvConfig
from lit_td3.envs.carla.reward import StepFacts, TermTotals, reward_terms
from lit_td3.envs.carla.route import RoutePosition, RouteTracker
from lit_td3.envs.carla.sensors import FRAME_SIZE, SensorReading, to_gray_frame
from lit_td3.envs.carla.server import (
    RestartBudget,
    SimulatorUnavailableError,
    Supervisor,
    TrafficManagerPortError,
    launch_hint,
)
from lit_td3.envs.carla.world import ScenarioError, WorldSession
from lit_td3.envs.wrappers import DISCARD_KEY

log = logging.getLogger(__name__)

FRAME_STACK = 4


class CarlaLaneKeepingEnv(gym.Env[dict[str, Any], np.ndarray]):
    """Lane keeping along a waypoint route with NPC traffic, in a synchronous CARLA world (see the module doc)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}  # noqa: RUF012 - gymnasium's own declaration

    def __init__(
        self,
        env_index: int = 0,
        server: dict[str, Any] | None = None,
        scenario: dict[str, Any] | None = None,
        sensors: dict[str, Any] | None = None,
        reward: dict[str, Any] | None = None,
        termination: dict[str, Any] | None = None,
        max_episode_steps: int = 500,
        render_mode: str | None = None,
    ) -> None:
        """Each group is a dict of the settings in ``config.py`` (``configs/carla.yaml`` spells out the defaults).

        ``env_index`` offsets the server's RPC and Traffic Manager ports by ``server.port_stride * env_index``.
        """
        self.config = CarlaEnvConfig.from_kwargs(
            env_index, server=server, scenario=scenario, sensors=sensors, reward=reward, termination=termination,
            max_episode_steps=max_episode_steps,
        )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode={render_mode!r}: expected null or 'rgb_array'")
        self.env_index, self.render_mode = env_index, render_mode
        lookahead = self.config.scenario.route.lookahead_waypoints
        image_shape, vector_shape = (FRAME_STACK, FRAME_SIZE, FRAME_SIZE), (3 + lookahead,)
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, image_shape, np.uint8),
            "vector": spaces.Box(-np.inf, np.inf, vector_shape, np.float32),
        })
        # What a faulted step returns: recognisably no observation, yet inside the space.
        self._null_observation: dict[str, np.ndarray] = {
            "image": np.zeros(image_shape, np.uint8), "vector": np.zeros(vector_shape, np.float32)}
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._supervisor = Supervisor(self.config.server, env_index)
        self._budget = RestartBudget(self.config.server.restart)
        self._session: WorldSession | None = None
        self._ever_connected = False
        self._closed = False
        self._episode: _Episode | None = None
        self._last_rgb: np.ndarray | None = None

    # --------------------------------------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._check_open()
        if seed is None:
            seed = self.config.scenario.seed + self.env_index if not self._ever_connected \
                else int(self.np_random.integers(2**31))
        reading = self._start_episode(seed)
        session = self._session
        assert session is not None and session.route is not None
        x, y, yaw, speed = session.ego_pose()
        tracker = RouteTracker(session.route, self.config.scenario.route.lookahead_waypoints)
        position = tracker.locate(x, y, yaw)
        frame = to_gray_frame(reading.rgb)
        self._episode = _Episode(tracker, position.s, (x, y), deque([frame] * FRAME_STACK, maxlen=FRAME_STACK))
        self._last_rgb = reading.rgb
        return _observation(self._episode.frames, speed, position), {"route_length_m": session.route.length_m}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        self._check_open()
        episode, session = self._episode, self._session
        if episode is None or session is None:
            raise RuntimeError("step() called without a running episode: call reset() first")
        steer, pedal = self._check_action(action)
        try:
            session.apply_control(steer, max(pedal, 0.0), max(-pedal, 0.0))
            reading = session.read(session.tick())
            x, y, yaw, speed = session.ego_pose()
        except RuntimeError as err:  # the wheel's RPC/tick time-outs, and SensorTimeoutError
            return self._fault_step(err)
        return self._transition(episode, reading, steer, (x, y, yaw, speed))

    def render(self) -> np.ndarray | None:
        """The latest front-camera image (H×W×3 RGB) in ``rgb_array`` mode."""
        return None if self.render_mode is None or self._last_rgb is None else self._last_rgb.copy()

    def close(self) -> None:
        """Leaves the server clean (see ``WorldSession.close``) and stops a server this env started; idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE_ENVS.discard(self)
        with _sigterm_deferred():
            try:
                self._drop_session()
            finally:
                self._supervisor.close()

    # --------------------------------------------------------------------------------------------- episodes
    def _transition(self, episode: _Episode, reading: SensorReading, steer: float,
                    pose: tuple[float, float, float, float]) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        x, y, yaw, speed = pose
        position = episode.tracker.locate(x, y, yaw)
        collision, invasion = bool(reading.collisions), bool(reading.lane_invasions)
        facts = StepFacts(position.s - episode.s, position.lateral_m, position.lane_width_m, speed, collision,
                          invasion, steer, episode.steer)
        terms = reward_terms(facts, self.config.reward)
        episode.advance(position.s, (x, y), steer, collision, invasion, to_gray_frame(reading.rgb), terms)
        self._last_rgb = reading.rgb
        stop = self.config.termination
        route_complete = position.s >= episode.tracker.route.length_m
        ends = {"collision": collision and stop.on_collision, "lane_invasion": invasion and stop.on_lane_invasion,
                "route_complete": route_complete and stop.on_route_complete}
        terminated = any(ends.values())
        truncated = not terminated and episode.steps >= self.config.max_episode_steps
        info = self._episode_info(episode) | {"reward_terms": terms, DISCARD_KEY: False}
        if terminated or truncated:
            info["end_reason"] = next((k for k, v in ends.items() if v), "time_limit")
            self._episode = None
        obs = _observation(episode.frames, speed, position)
        return obs, float(sum(terms.values())), terminated, truncated, info

    def _fault_step(self, err: BaseException) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Ends the episode as truncated; the transition is marked for discarding and its observation is null."""
        episode = self._episode
        assert episode is not None
        log.warning("CARLA fault in env %d (%s) at episode step %d: %s. The episode ends here (truncated, "
                    "transition discarded); the next reset reconnects.", self.env_index, self._supervisor.address,
                    episode.steps + 1, err)
        self._drop_session()
        self._episode = None
        info = self._episode_info(episode) | {DISCARD_KEY: True, "fault": f"{type(err).__name__}: {err}", "end_reason": "fault"}
        null = {key: value.copy() for key, value in self._null_observation.items()}
        return null, 0.0, False, True, info

    def _episode_info(self, episode: _Episode) -> dict[str, Any]:
        """The episode so far; in every step, so the final info is complete whoever ends the episode."""
        return {
            "collision": float(episode.collided),
            "lane_invasion": float(episode.invaded),
            "route_completion": min(episode.best_s / episode.tracker.route.length_m, 1.0),
            "distance_m": episode.distance_m,
            **episode.totals.info(),
        }

    @staticmethod
    def _check_action(action: np.ndarray) -> tuple[float, float]:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (2,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action={action!r}: expected 2 finite numbers [steer, pedal] in [-1, 1]")
        steer, pedal = np.clip(a, -1.0, 1.0)
        return float(steer), float(pedal)

    # --------------------------------------------------------------------------------------------- connection
    def _start_episode(self, seed: int) -> SensorReading:
        """Starts an episode, recovering from faults within the restart budget."""
        failures = 0
        while True:
            if self._session is None and self._ever_connected and self._budget.lifetime_spent():
                raise SimulatorUnavailableError(
                    f"the CARLA server at {self._supervisor.address} needed {self._budget.recoveries} recoveries "
                    f"({ROOT}.server.restart.max_recoveries); giving up"
                )
            try:
                if self._session is None:
                    self._open_session()
                assert self._session is not None
                return self._session.start_episode(seed)
            except (ScenarioError, TrafficManagerPortError):
                self._drop_session()
                raise
            except RuntimeError as err:  # time-outs, lost connections, spawn failures, SimulatorUnavailableError
                if not self._ever_connected:
                    raise  # the first connection's error already says what to do
                failures += 1
                self._drop_session()
                if self._budget.spent(failures):
                    raise SimulatorUnavailableError(
                        f"the CARLA server at {self._supervisor.address} is unavailable: {failures} recovery "
                        f"attempts failed ({ROOT}.server.restart.attempts={self._budget.config.attempts}); last error: "
                        f"{err}. {launch_hint(self._supervisor.host, self._supervisor.port)}"
                    ) from None
                delay = self._budget.delay_s(failures)
                log.warning("env %d: attempt %d to get the CARLA server at %s back failed (%s); retrying in %.1f s",
                            self.env_index, failures, self._supervisor.address, err, delay)
                time.sleep(delay)

    def _open_session(self) -> None:
        carla = _import_carla()
        if self._ever_connected:
            self._budget.recoveries += 1
            client = self._supervisor.reconnect(carla)
        else:
            client = self._supervisor.connect(carla)
            self._ever_connected = True
            _guard_process()
            _LIVE_ENVS.add(self)
        self._session = WorldSession(carla, client, self.config, self.env_index)
        self._session.setup()

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CarlaLaneKeepingEnv is closed")


def _observation(frames: deque[np.ndarray], speed: float, position: RoutePosition) -> dict[str, np.ndarray]:
    vector = [speed, position.lateral_m, position.heading_error_rad, *position.waypoint_distances_m]
    return {"image": np.stack(frames), "vector": np.asarray(vector, dtype=np.float32)}


class _Episode:
    """Running state of one episode."""

    def __init__(self, tracker: RouteTracker, s: float, xy: tuple[float, float], frames: deque[np.ndarray]) -> None:
        self.tracker, self.s, self.best_s, self.xy, self.frames = tracker, s, s, xy, frames
        self.steps, self.steer, self.distance_m = 0, 0.0, 0.0
        self.collided = self.invaded = False
        self.totals = TermTotals()

    def advance(self, s: float, xy: tuple[float, float], steer: float, collision: bool, invasion: bool,
                frame: np.ndarray, terms: dict[str, float]) -> None:
        self.steps += 1
        self.distance_m += float(np.hypot(xy[0] - self.xy[0], xy[1] - self.xy[1]))
        self.s, self.best_s, self.xy, self.steer = s, max(self.best_s, s), xy, steer
        self.collided |= collision
        self.invaded |= invasion
        self.frames.append(frame)
        self.totals.add(terms)


# ------------------------------------------------------------------------------------------------- process guard
_LIVE_ENVS: weakref.WeakSet[CarlaLaneKeepingEnv] = weakref.WeakSet()
_GUARDED_PID: int | None = None
_CLOSING = 0
_SIGTERM_PENDING = False


def _import_carla() -> ModuleType:
    try:
        import carla
    except ImportError as err:
        raise ImportError(
            f"the CARLA env needs the CARLA 0.9.16 client: pip install -e '.[carla]' ({err})"
        ) from None
    return carla


def _guard_process() -> None:
    """Makes SIGTERM and interpreter exit close every connected env of this process (see docs/carla.md).

    SIGTERM's default action kills the process without unwinding, leaving the world in synchronous mode (frozen
    for every other client) and our actors behind. The handler raises ``SystemExit`` instead, so ``finally``
    blocks (gymnasium's vector-env worker calls ``env.close()`` in one) and the ``atexit`` hook below run. It is
    installed only where nobody else handles SIGTERM, or in a multiprocessing child, whose handler can only be one
    inherited through fork from the parent (e.g. Lightning's, which sets a flag on the parent's trainer and would
    leave the worker running). Only the main thread can install signal handlers.
    """
    global _GUARDED_PID
    if os.getpid() == _GUARDED_PID:
        return
    _GUARDED_PID = os.getpid()  # a forked child inherits this module's state, not the parent's duty
    atexit.register(_close_live_envs)
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current == signal.SIG_DFL or (multiprocessing.parent_process() is not None and callable(current)):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _SIGTERM_PENDING
    if _CLOSING:
        _SIGTERM_PENDING = True  # let the cleanup finish; _sigterm_deferred exits right after it
        return
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Holds SIGTERM (through our handler) until the block is done, so cleanup is never cut half-way."""
    global _CLOSING, _SIGTERM_PENDING
    _CLOSING += 1
    try:
        yield
    finally:
        _CLOSING -= 1
    if _SIGTERM_PENDING and not _CLOSING:
        _SIGTERM_PENDING = False
        raise SystemExit(128 + signal.SIGTERM)


def _close_live_envs() -> None:
    for env in list(_LIVE_ENVS):
        try:
            env.close()
        except Exception as err:  # noqa: BLE001 - at exit, one env's failure must not keep the others dirty
            log.warning("closing CARLA env %d at exit failed: %s", env.env_index, err)
