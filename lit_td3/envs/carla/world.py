"""One client's hold on the CARLA world: synchronous mode, the Traffic Manager, the episode's actors, and cleanup.

``WorldSession.setup`` loads the scenario's town, switches the world and the Traffic Manager to synchronous mode with
a fixed delta, sets the weather and builds the route. ``start_episode`` spawns the ego, its sensors and the NPCs and
ticks through the warm-up. ``close`` leaves the server clean: sensors stopped, Traffic Manager and world back to
asynchronous mode, and every actor of ours destroyed in one batch with the sensors ahead of the vehicles; once the
server stops answering it gives up at once rather than waiting out a time-out per call.

This module knows nothing of observations, rewards or retries; it only talks to the simulator.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

import numpy as np

from lit_td3.envs.carla.config import ROOT, CarlaEnvConfig
from lit_td3.envs.carla.route import Route
from lit_td3.envs.carla.sensors import SensorReading, SensorRig
from lit_td3.envs.carla.server import TrafficManagerPortError, free_port, port_bindable

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT_S = 2.0
"""RPC time-out while cleaning up: a dead server must not hold ``close()`` for minutes."""

_TM_PORTS_OF_THIS_PROCESS: set[int] = set()
"""Traffic Manager ports this process opened: the wheel keeps one TM per port per process and hands it out again,
so our own earlier TM holding the port is not "in use by another process"."""


class ScenarioError(RuntimeError):
    """The scenario cannot be set up on this server (town missing, spawn point out of range); never retried."""


def _find(library: Any, blueprint_id: str, field: str) -> Any:
    try:
        return library.find(blueprint_id)
    except IndexError:
        raise ScenarioError(f"{ROOT}.{field}={blueprint_id!r} is not in the server's blueprint library") from None


def is_timeout(err: BaseException) -> bool:
    """Whether a client error is the wheel's "time-out of N ms while waiting for the simulator"."""
    return "time-out" in str(err)


def acquire_traffic_manager(client: Any, port: int, policy: str) -> tuple[Any, int]:
    """The Traffic Manager on ``port``, or on a free port when another process holds it and ``policy`` allows."""
    if port not in _TM_PORTS_OF_THIS_PROCESS and not port_bindable(port):
        if policy == "fail":
            raise TrafficManagerPortError(
                f"Traffic Manager port {port} is in use by another process; free it, choose another "
                f"{ROOT}.server.tm_port, or set {ROOT}.server.tm_port_in_use: pick_free"
            )
        taken, port = port, free_port()
        log.warning("Traffic Manager port %d is in use by another process; using free port %d", taken, port)
    tm = client.get_trafficmanager(port)
    _TM_PORTS_OF_THIS_PROCESS.add(port)
    return tm, port


class WorldSession:
    """The world of one connected client, and the actors of the current episode."""

    def __init__(self, carla: ModuleType, client: Any, config: CarlaEnvConfig, env_index: int) -> None:
        self.carla, self.client, self.config = carla, client, config
        self.env_index = env_index
        self.role_name = f"lit_td3/env{env_index}"
        self.world: Any = None
        self.tm: Any = None
        self.tm_port: int | None = None
        self.spawn_transform: Any = None
        self.route: Route | None = None
        self.ego: Any = None
        self.rig: SensorRig | None = None
        self.actors: list[Any] = []
        self._original_fixed_delta: float | None = None

    # --------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Town, synchronous mode, Traffic Manager, weather and route; leftovers of a killed run are removed."""
        scenario, server = self.config.scenario, self.config.server
        self.world = self._load_town(scenario.town)
        settings = self.world.get_settings()
        self._original_fixed_delta = settings.fixed_delta_seconds
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = scenario.fixed_delta_s
        self.world.apply_settings(settings)
        self.tm, self.tm_port = acquire_traffic_manager(
            self.client, server.traffic_manager_port(self.env_index), server.tm_port_in_use)
        self.tm.set_synchronous_mode(True)
        self.tm.set_global_distance_to_leading_vehicle(scenario.npc.distance_to_leading_m)
        self.tm.global_percentage_speed_difference(scenario.npc.speed_difference_pct)
        self.world.set_weather(getattr(self.carla.WeatherParameters, scenario.weather))
        self._destroy_leftovers()
        spawn_points = self.world.get_map().get_spawn_points()
        if scenario.spawn_point >= len(spawn_points):
            raise ScenarioError(
                f"{ROOT}.scenario.spawn_point={scenario.spawn_point}: {scenario.town} has {len(spawn_points)} "
                f"spawn points (0..{len(spawn_points) - 1})"
            )
        self.spawn_transform = spawn_points[scenario.spawn_point]
        self.route = Route.from_map(self.world.get_map(), self.spawn_transform.location, scenario.route)

    def _load_town(self, town: str) -> Any:
        world = self.client.get_world()
        if world.get_map().name.split("/")[-1] == town:
            return world
        available = [name.split("/")[-1] for name in self.client.get_available_maps()]
        if town not in available:
            raise ScenarioError(f"{ROOT}.scenario.town={town!r} is not on the server; it has {sorted(available)}")
        self.client.set_timeout(self.config.server.load_world_timeout_s)
        try:
            return self.client.load_world(town)
        finally:
            self.client.set_timeout(self.config.server.timeout_s)

    def _destroy_leftovers(self) -> None:
        """Actors with our role name (and sensors on them) left by a run of this env index that was killed."""
        actors = list(self.world.get_actors())
        ours = {a.id for a in actors if a.attributes.get("role_name") == self.role_name}
        attached = {a.id for a in actors if a.parent is not None and a.parent.id in ours}
        if ours:
            log.warning("destroying %d actors left behind by an earlier run of env %d", len(ours | attached),
                        self.env_index)
            self._destroy([*attached, *(ours - attached)], tick=True)

    # --------------------------------------------------------------------------------------------- episodes
    def start_episode(self, seed: int) -> SensorReading:
        """Fresh ego, sensors and NPCs at the scenario's start; returns the sensors' reading after the warm-up."""
        self.destroy_actors(tick=True)
        self.tm.set_random_device_seed(seed)
        library = self.world.get_blueprint_library()
        ego_bp = _find(library, self.config.scenario.ego_blueprint, "scenario.ego_blueprint")
        ego_bp.set_attribute("role_name", self.role_name)
        self.ego = self.world.try_spawn_actor(ego_bp, self.spawn_transform)
        if self.ego is None:
            raise RuntimeError(f"the ego's spawn point {self.spawn_transform.location} is blocked")
        self.actors.append(self.ego)
        self.rig = SensorRig(self.carla, self.world, self.ego, self.config.sensors, self._spawn_attached,
                             self.role_name)
        self._spawn_npcs(library, np.random.default_rng(seed))
        self.ego.apply_control(self.carla.VehicleControl(brake=1.0))
        frame = self.tick()
        for _ in range(self.config.scenario.warmup_ticks):
            frame = self.tick()
        return self.read(frame)

    def _spawn_attached(self, blueprint: Any, transform: Any, parent: Any) -> Any:
        actor = self.world.spawn_actor(blueprint, transform, attach_to=parent)
        self.actors.append(actor)
        return actor

    def _spawn_npcs(self, library: Any, rng: np.random.Generator) -> None:
        npc = self.config.scenario.npc
        if npc.count == 0:
            return
        blueprints = [bp for bp in library.filter(npc.blueprint_filter)
                      if bp.has_attribute("number_of_wheels") and bp.get_attribute("number_of_wheels").as_int() == 4]
        if not blueprints:
            raise ScenarioError(f"{ROOT}.scenario.npc.blueprint_filter={npc.blueprint_filter!r} matches no "
                                "four-wheeled vehicle on the server")
        start = self.spawn_transform.location
        points = [p for p in self.world.get_map().get_spawn_points()
                  if p.location.distance(start) >= npc.min_distance_m]
        spawned = 0
        for index in rng.permutation(len(points)):
            if spawned == npc.count:
                break
            bp = blueprints[int(rng.integers(len(blueprints)))]
            bp.set_attribute("role_name", self.role_name)
            vehicle = self.world.try_spawn_actor(bp, points[index])
            if vehicle is not None:
                self.actors.append(vehicle)
                vehicle.set_autopilot(True, self.tm_port)
                spawned += 1
        if spawned < npc.count:
            log.warning("spawned %d of %d NPC vehicles (free spawn points ran out)", spawned, npc.count)

    def tick(self) -> int:
        """One synchronous step of the world; returns its frame number."""
        return int(self.world.tick(self.config.server.tick_timeout_s))

    def read(self, frame: int) -> SensorReading:
        """The sensors' reading of ``frame``; raises ``SensorTimeoutError``."""
        if self.rig is None:
            raise RuntimeError("no episode is running in this CARLA session")
        return self.rig.read(frame)

    def apply_control(self, steer: float, throttle: float, brake: float) -> None:
        self.ego.apply_control(self.carla.VehicleControl(throttle=throttle, steer=steer, brake=brake))

    def ego_pose(self) -> tuple[float, float, float, float]:
        """x (m), y (m), yaw (rad) and forward speed (m/s) of the ego, as of the last tick."""
        transform, velocity = self.ego.get_transform(), self.ego.get_velocity()
        forward = transform.get_forward_vector()
        speed = velocity.x * forward.x + velocity.y * forward.y + velocity.z * forward.z
        return transform.location.x, transform.location.y, math.radians(transform.rotation.yaw), speed

    # --------------------------------------------------------------------------------------------- cleanup
    def destroy_actors(self, tick: bool) -> None:
        """Stops the sensors, then destroys this episode's actors in one batch, sensors first."""
        self._stop_sensors()
        sensor_ids = [s.id for s in self.rig.sensors] if self.rig is not None else []
        others = [a.id for a in self.actors if a.id not in sensor_ids]
        self.rig, self.ego, self.actors = None, None, []
        self._destroy(sensor_ids + others, tick)

    def _stop_sensors(self) -> None:
        if self.rig is not None:
            self.rig.stop()

    def _destroy(self, actor_ids: list[int], tick: bool) -> None:
        if not actor_ids:
            return
        destroy = self.carla.command.DestroyActor
        # In synchronous mode the removal takes effect on a tick; without it the next ego could find its spawn
        # point still occupied.
        responses = self.client.apply_batch_sync([destroy(i) for i in actor_ids], tick)
        failed = [r.error for r in responses if r.error]
        if failed:
            log.warning("%d of %d actors could not be destroyed: %s", len(failed), len(actor_ids), failed[:3])

    def close(self) -> None:
        """Leaves the server as we found it; best effort, and quick when the server no longer answers."""
        self.client.set_timeout(min(self.config.server.timeout_s, CLEANUP_TIMEOUT_S))
        steps = [
            ("stop the sensors", self._stop_sensors),
            ("put the Traffic Manager in asynchronous mode", lambda: self.tm is not None
             and self.tm.set_synchronous_mode(False)),
            ("put the world in asynchronous mode", self._restore_asynchronous),
            ("destroy our actors", lambda: self.destroy_actors(tick=False)),
        ]
        for what, step in steps:
            try:
                step()
            except RuntimeError as err:
                log.warning("cleanup: could not %s on the CARLA server: %s", what, err)
                if is_timeout(err):
                    log.warning("cleanup: the server does not answer; its actors go when it does")
                    break
        self.rig, self.ego, self.actors, self.world = None, None, [], None

    def _restore_asynchronous(self) -> None:
        if self.world is None:
            return
        settings = self.world.get_settings()
        settings.synchronous_mode = False
        settings.fixed_delta_seconds = self._original_fixed_delta
        self.world.apply_settings(settings)
