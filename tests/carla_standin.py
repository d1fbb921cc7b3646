"""An in-process stand-in for the part of the CARLA 0.9.16 server that ``lit_td3.envs.carla`` uses, with faults.

Tests replace ``carla.Client`` with ``StandinRegistry.client_class`` and leave the rest of the real wheel in place:
locations, transforms, rotations, vectors, ``VehicleControl``, ``WorldSettings``, ``WeatherParameters`` and
``command.DestroyActor`` are the wheel's own, and so is the map, a real ``carla.Map`` built from a small OpenDRIVE
loop (two 200 m straights joined by 180° bends, two lanes each way), so ``get_waypoint``, ``waypoint.next``, lane
widths and lane markings behave as CARLA's. What this module imitates is the server: world and settings, blueprints,
actors, sensors with callbacks on another thread, the Traffic Manager (which binds a real TCP port, as CARLA's does),
frames, and the client's time-out error, with the signatures of the 0.9.16 wheel.

Faults, armed on a ``StandinServer`` and counted in ticks from the moment they are armed:
``fail_tick(n)`` (the n-th tick times out), ``kill_at_tick(n)`` / ``kill()`` (server gone; ``revive()`` brings a
fresh one), ``camera_fault(n, "late" | "missing" | "stale", delay_s)``, ``inject_collision(n)``; a test binds a
Traffic Manager port itself to make it "in use". With ``requires_listener=True`` a server is reachable only while
some process listens on its TCP port: run this file as a script (``python tests/carla_standin.py --listen PORT
--pidfile FILE``) to be that process, which is how the restart tests give the env a real server command to run.

Simplifications (the env must not rely on them): vehicles are kinematic bicycles; collisions are centre distances
below 2.2 m (or injected); a lane invasion fires when a vehicle's centre changes lane or leaves the road; the camera
draws two lane lines and a band whose grey level stamps the frame number (``stamp_value``).
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import carla
import numpy as np

SERVER_VERSION = "0.9.16"
LANE_WIDTH = 3.5


# ------------------------------------------------------------------------------------------------- the map
def _loop_xodr(straight: float = 200.0, radius: float = 40.0) -> str:
    def lanes() -> str:
        def lane(i: int, mark: str) -> str:
            return (f'<lane id="{i}" type="driving" level="false"><link><predecessor id="{i}"/><successor id="{i}"/>'
                    f'</link><width sOffset="0.0" a="{LANE_WIDTH}" b="0" c="0" d="0"/><roadMark sOffset="0" '
                    f'type="{mark}" weight="standard" color="standard" width="0.15"/></lane>')
        return ('<lanes><laneSection s="0.0"><left>' + lane(1, "solid") + '</left><center><lane id="0" type="none" '
                'level="false"><roadMark sOffset="0" type="solid" weight="standard" color="yellow" width="0.15"/>'
                '</lane></center><right>' + lane(-1, "broken") + lane(-2, "solid") + '</right></laneSection></lanes>')

    def road(rid: int, pred: int, succ: int, x: float, y: float, hdg: float, length: float, curv: float) -> str:
        geometry = "<line/>" if curv == 0 else f'<arc curvature="{curv}"/>'
        return (f'<road name="r{rid}" length="{length}" id="{rid}" junction="-1"><link>'
                f'<predecessor elementType="road" elementId="{pred}" contactPoint="end"/>'
                f'<successor elementType="road" elementId="{succ}" contactPoint="start"/></link>'
                f'<planView><geometry s="0.0" x="{x}" y="{y}" hdg="{hdg}" length="{length}">{geometry}</geometry>'
                f'</planView>{lanes()}</road>')

    arc = math.pi * radius
    roads = [road(1, 4, 2, 0, 0, 0, straight, 0), road(2, 1, 3, straight, 0, 0, arc, 1 / radius),
             road(3, 2, 4, straight, 2 * radius, math.pi, straight, 0), road(4, 3, 1, 0, 2 * radius, math.pi, arc,
                                                                              1 / radius)]
    return ('<?xml version="1.0" standalone="yes"?><OpenDRIVE><header revMajor="1" revMinor="4" name="loop" '
            'version="1.00" north="0" south="0" east="0" west="0"><geoReference><![CDATA[+proj=tmerc +lat_0=0 '
            '+lon_0=0 +k=1 +x_0=0 +y_0=0 +datum=WGS84 +units=m]]></geoReference></header>'
            + "".join(roads) + "</OpenDRIVE>")


LOOP_XODR = _loop_xodr()
LOOP_LENGTH_M = 2 * 200.0 + 2 * math.pi * 40.0


class StandinMap(carla.Map):
    """The wheel's own map of the loop; plus spawn points (an OpenDRIVE-only map has none) every 15 m per lane."""

    def __init__(self, name: str) -> None:
        super().__init__(name, LOOP_XODR)
        waypoints = sorted(self.generate_waypoints(15.0), key=lambda w: (w.road_id, abs(w.lane_id), w.lane_id > 0, w.s))
        self._spawn_points = [carla.Transform(carla.Location(w.transform.location.x, w.transform.location.y, 0.3),
                                              w.transform.rotation) for w in waypoints]

    def get_spawn_points(self) -> list[carla.Transform]:
        return [carla.Transform(t.location, t.rotation) for t in self._spawn_points]


# ------------------------------------------------------------------------------------------------- blueprints
class StandinAttribute:
    def __init__(self, attr_id: str, value: str) -> None:
        self.id, self._value = attr_id, value

    def as_int(self) -> int:
        return int(self._value)

    def as_float(self) -> float:
        return float(self._value)

    def as_str(self) -> str:
        return self._value

    def __str__(self) -> str:
        return self._value


class StandinBlueprint:
    def __init__(self, blueprint_id: str, tags: list[str], attributes: dict[str, str]) -> None:
        self.id, self.tags, self._attributes = blueprint_id, tags, dict(attributes)

    def has_attribute(self, attr_id: str) -> bool:
        return attr_id in self._attributes

    def get_attribute(self, attr_id: str) -> StandinAttribute:
        if attr_id not in self._attributes:
            raise IndexError(f"no attribute '{attr_id}' in blueprint '{self.id}'")
        return StandinAttribute(attr_id, self._attributes[attr_id])

    def set_attribute(self, attr_id: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"set_attribute({attr_id!r}, {value!r}): the value must be a str (as in the wheel)")
        self.get_attribute(attr_id)
        self._attributes[attr_id] = value

    def copy(self) -> StandinBlueprint:
        return StandinBlueprint(self.id, list(self.tags), self._attributes)


def _catalogue() -> list[StandinBlueprint]:
    vehicles = [("vehicle.tesla.model3", 4), ("vehicle.audi.a2", 4), ("vehicle.lincoln.mkz_2020", 4),
                ("vehicle.nissan.micra", 4), ("vehicle.mercedes.coupe_2020", 4), ("vehicle.kawasaki.ninja", 2),
                ("vehicle.bh.crossbike", 2)]
    out = [StandinBlueprint(i, i.split(".")[1:], {"role_name": "", "number_of_wheels": str(n), "color": "0,0,0"})
           for i, n in vehicles]
    out.append(StandinBlueprint("sensor.camera.rgb", ["sensor", "camera", "rgb"], {
        "role_name": "", "image_size_x": "800", "image_size_y": "600", "fov": "90", "sensor_tick": "0.0"}))
    out.append(StandinBlueprint("sensor.other.collision", ["sensor", "other", "collision"], {"role_name": ""}))
    out.append(StandinBlueprint("sensor.other.lane_invasion", ["sensor", "other", "lane_invasion"],
                                {"role_name": ""}))
    return out


class StandinBlueprintLibrary:
    def __init__(self, blueprints: list[StandinBlueprint]) -> None:
        self._blueprints = blueprints

    def find(self, blueprint_id: str) -> StandinBlueprint:
        for bp in self._blueprints:
            if bp.id == blueprint_id:
                return bp.copy()
        raise IndexError(f"blueprint '{blueprint_id}' not found")

    def filter(self, pattern: str) -> StandinBlueprintLibrary:
        return StandinBlueprintLibrary([bp.copy() for bp in self._blueprints if fnmatch.fnmatch(bp.id, pattern)])

    def __iter__(self) -> Any:
        return iter(self._blueprints)

    def __len__(self) -> int:
        return len(self._blueprints)


# ------------------------------------------------------------------------------------------------- sensor data
@dataclass
class StandinImage:
    frame: int
    timestamp: float
    transform: carla.Transform
    width: int
    height: int
    fov: float
    raw_data: bytes


@dataclass
class StandinCollisionEvent:
    frame: int
    timestamp: float
    transform: carla.Transform
    actor: Any
    other_actor: Any
    normal_impulse: carla.Vector3D


@dataclass
class StandinLaneInvasionEvent:
    frame: int
    timestamp: float
    transform: carla.Transform
    actor: Any
    crossed_lane_markings: list[Any]


def stamp_value(frame: int) -> int:
    """Grey level of the stand-in camera's top band in ``frame``: tells a test which frame an image shows."""
    return 20 + (frame * 37) % 200


# ------------------------------------------------------------------------------------------------- actors
class StandinActor:
    def __init__(self, client: StandinClient, server: StandinServer, actor_id: int, blueprint: StandinBlueprint,
                 transform: carla.Transform, parent: StandinActor | None) -> None:
        self._client, self._server, self.id, self.type_id = client, server, actor_id, blueprint.id
        self.attributes = dict(blueprint._attributes)
        self.parent = parent
        self._location = carla.Location(transform.location.x, transform.location.y, transform.location.z)
        self._yaw = transform.rotation.yaw
        self._pitch = transform.rotation.pitch
        self._speed = 0.0

    @property
    def is_alive(self) -> bool:
        return self._server.actors.get(self.id) is self

    def get_transform(self) -> carla.Transform:  # client-side cache in the wheel: no RPC
        if self.parent is not None:
            mount = carla.Transform(self._location, carla.Rotation(pitch=self._pitch, yaw=self._yaw))
            parent = self.parent.get_transform()
            return carla.Transform(carla.Location(parent.transform(mount.location)),
                                   carla.Rotation(pitch=self._pitch, yaw=parent.rotation.yaw + self._yaw))
        return carla.Transform(carla.Location(self._location.x, self._location.y, self._location.z),
                               carla.Rotation(yaw=self._yaw))

    def get_location(self) -> carla.Location:
        return self.get_transform().location

    def get_velocity(self) -> carla.Vector3D:
        yaw = math.radians(self._yaw)
        return carla.Vector3D(self._speed * math.cos(yaw), self._speed * math.sin(yaw), 0.0)

    def _rpc(self) -> None:
        self._server.rpc(self._client.timeout_s)

    def destroy(self) -> bool:
        self._rpc()
        return self._server.destroy(self.id)


class StandinVehicle(StandinActor):
    WHEELBASE_M = 2.9
    MAX_STEER_RAD = math.radians(35.0)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._control = carla.VehicleControl()
        self.autopilot_port: int | None = None
        self._lane: tuple[int, int] | None = None

    def apply_control(self, control: carla.VehicleControl) -> None:
        if not isinstance(control, carla.VehicleControl):
            raise TypeError(f"apply_control expects carla.VehicleControl, got {type(control).__name__}")
        self._rpc()
        self._control = control

    def get_control(self) -> carla.VehicleControl:
        return self._control

    def set_autopilot(self, enabled: bool = True, tm_port: int = 8000) -> None:
        self._rpc()
        if tm_port not in self._server.traffic_managers:
            raise RuntimeError(f"no Traffic Manager on port {tm_port} for this server")
        self.autopilot_port = tm_port if enabled else None

    def drive(self, dt: float) -> None:
        """Kinematic bicycle under ``apply_control``."""
        c = self._control
        accel = 5.0 * c.throttle - 9.0 * c.brake - 0.3 * self._speed
        self._speed = max(0.0, self._speed + accel * dt)
        yaw = math.radians(self._yaw)
        self._yaw = math.degrees(yaw + self._speed / self.WHEELBASE_M * math.tan(c.steer * self.MAX_STEER_RAD) * dt)
        self._location = carla.Location(self._location.x + self._speed * math.cos(yaw) * dt,
                                        self._location.y + self._speed * math.sin(yaw) * dt, 0.0)

    def follow_lane(self, dt: float, speed: float, blocked: bool) -> None:
        """What the Traffic Manager does, roughly: follow the lane, stop behind a vehicle ahead."""
        self._speed = 0.0 if blocked else speed
        waypoint = self._server.map.get_waypoint(self._location)
        if self._speed > 0:
            waypoint = waypoint.next(self._speed * dt)[0]
        self._location = carla.Location(waypoint.transform.location.x, waypoint.transform.location.y, 0.0)
        self._yaw = waypoint.transform.rotation.yaw


class StandinSensor(StandinActor):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._callback: Callable[[Any], None] | None = None

    def listen(self, callback: Callable[[Any], None]) -> None:
        self._rpc()
        self._callback = callback

    def stop(self) -> None:
        self._rpc()
        self._callback = None

    def is_listening(self) -> bool:
        return self._callback is not None

    def deliver(self, data: Any) -> None:
        callback = self._callback
        if callback is not None and self.is_alive:
            callback(data)


class StandinActorList(list):
    def filter(self, pattern: str) -> StandinActorList:
        return StandinActorList(a for a in self if fnmatch.fnmatch(a.type_id, pattern))

    def find(self, actor_id: int) -> Any:
        return next((a for a in self if a.id == actor_id), None)


# ------------------------------------------------------------------------------------------------- TM, world
class StandinTrafficManager:
    def __init__(self, client: StandinClient, server: StandinServer, port: int) -> None:
        self._client, self._server, self._port = client, server, port
        self.synchronous = False
        self.seed: int | None = None
        self.speed_difference_pct = 30.0

    def _rpc(self) -> None:
        self._server.rpc(self._client.timeout_s)

    def get_port(self) -> int:
        return self._port

    def set_synchronous_mode(self, mode_switch: bool) -> None:
        self._rpc()
        self.synchronous = bool(mode_switch)

    def set_random_device_seed(self, value: int) -> None:
        self._rpc()
        self.seed = int(value)

    def set_global_distance_to_leading_vehicle(self, distance: float) -> None:
        self._rpc()

    def global_percentage_speed_difference(self, percentage: float) -> None:
        self._rpc()
        self.speed_difference_pct = float(percentage)


class StandinWorld:
    def __init__(self, client: StandinClient, server: StandinServer) -> None:
        self._client, self._server = client, server
        self.id = server.episode_id

    def _rpc(self) -> None:
        self._server.rpc(self._client.timeout_s)

    def get_settings(self) -> carla.WorldSettings:
        self._rpc()
        return _copy_settings(self._server.settings)

    def apply_settings(self, settings: carla.WorldSettings, seconds: float = 0.0) -> int:
        self._rpc()
        self._server.settings = _copy_settings(settings)
        return self._server.frame

    def get_map(self) -> StandinMap:
        self._rpc()
        return self._server.map

    def get_blueprint_library(self) -> StandinBlueprintLibrary:
        self._rpc()
        return StandinBlueprintLibrary(_catalogue())

    def spawn_actor(self, blueprint: StandinBlueprint, transform: carla.Transform, attach_to: Any = None,
                    attachment_type: Any = None, bone: str = "") -> StandinActor:
        actor = self.try_spawn_actor(blueprint, transform, attach_to)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def try_spawn_actor(self, blueprint: StandinBlueprint, transform: carla.Transform, attach_to: Any = None,
                        attachment_type: Any = None, bone: str = "") -> StandinActor | None:
        self._rpc()
        return self._server.spawn(self._client, blueprint, transform, attach_to)

    def get_actors(self, actor_ids: Iterable[int] | None = None) -> StandinActorList:
        self._rpc()
        actors = list(self._server.actors.values())
        return StandinActorList(a for a in actors if actor_ids is None or a.id in set(actor_ids))

    def set_weather(self, weather: carla.WeatherParameters) -> None:
        if not isinstance(weather, carla.WeatherParameters):
            raise TypeError(f"set_weather expects carla.WeatherParameters, got {type(weather).__name__}")
        self._rpc()
        self._server.weather = weather

    def tick(self, seconds: float = 0.0) -> int:
        return self._server.tick(seconds or self._client.timeout_s)


def _copy_settings(s: carla.WorldSettings) -> carla.WorldSettings:
    out = carla.WorldSettings(synchronous_mode=s.synchronous_mode, no_rendering_mode=s.no_rendering_mode)
    out.fixed_delta_seconds = s.fixed_delta_seconds
    return out


@dataclass
class StandinResponse:
    actor_id: int
    error: str = ""

    def has_error(self) -> bool:
        return bool(self.error)


# ------------------------------------------------------------------------------------------------- server
@dataclass
class _CameraFault:
    mode: str
    delay_s: float


@dataclass
class Faults:
    tick_timeouts: set[int] = field(default_factory=set)
    kill_at: int | None = None
    camera: dict[int, _CameraFault] = field(default_factory=dict)
    collisions: set[int] = field(default_factory=set)


class StandinServer:
    """One simulated CARLA server at ``host:port``; its state vanishes when it dies, as a real server's does."""

    def __init__(self, registry: StandinRegistry, port: int, town: str = "Town10HD_Opt",
                 requires_listener: bool = False) -> None:
        self.registry, self.port = registry, port
        self.requires_listener = requires_listener
        self.towns = ("Town01", "Town02", "Town10HD_Opt")
        self.incarnation = 0
        self.killed = False
        self._down = False
        self.rpc_calls = 0
        self._reset_state(town)

    def _reset_state(self, town: str) -> None:
        self.map = StandinMap(f"Carla/Maps/{town}")
        self.settings = carla.WorldSettings()
        self.weather = carla.WeatherParameters.Default
        self.actors: dict[int, StandinActor] = {}
        self.traffic_managers: dict[int, StandinTrafficManager] = {}
        self.frame = 1000
        self.ticks = 0
        self.episode_id = self.incarnation * 1000 + 1
        self.faults = Faults()
        self.destroy_batches: list[list[tuple[int, str]]] = []
        self.violations: list[str] = []
        self._next_id = 100
        self._last_image: dict[int, StandinImage] = {}

    # --------------------------------------------------------------------------------------------- reachability
    def reachable(self) -> bool:
        if self.killed:
            return False
        return not self.requires_listener or _port_held(self.port)

    def rpc(self, timeout_s: float) -> None:
        """Every call that goes to the server: a time-out when it is gone, a fresh world when it came back."""
        self.rpc_calls += 1
        if not self.reachable():
            self._down = True
            self.actors = {}
            _time_out(timeout_s, self.port)
        if self._down:
            self._down = False
            self.incarnation += 1
            self._reset_state("Town10HD_Opt")

    def kill(self) -> None:
        self.killed = True
        self._down = True
        self.actors = {}

    def revive(self) -> None:
        self.killed = False

    def load(self, town: str) -> None:
        self.episode_id += 1
        self._reset_state(town)

    # --------------------------------------------------------------------------------------------- faults
    def fail_tick(self, n: int) -> None:
        self.faults.tick_timeouts.add(self.ticks + n)

    def kill_at_tick(self, n: int) -> None:
        self.faults.kill_at = self.ticks + n

    def camera_fault(self, n: int, mode: str, delay_s: float = 0.0) -> None:
        assert mode in ("late", "missing", "stale"), mode
        self.faults.camera[self.ticks + n] = _CameraFault(mode, delay_s)

    def inject_collision(self, n: int) -> None:
        self.faults.collisions.add(self.ticks + n)

    # --------------------------------------------------------------------------------------------- actors
    def spawn(self, client: StandinClient, blueprint: StandinBlueprint, transform: carla.Transform,
              parent: Any) -> StandinActor | None:
        if not isinstance(transform, carla.Transform):
            raise TypeError(f"spawn expects carla.Transform, got {type(transform).__name__}")
        if parent is not None and not parent.is_alive:
            raise RuntimeError(f"parent actor {parent.id} is not alive")
        is_vehicle = blueprint.id.startswith("vehicle.")
        if is_vehicle and any(v.get_location().distance(transform.location) < 2.5 for v in self.vehicles()):
            return None
        cls = StandinVehicle if is_vehicle else StandinSensor
        actor = cls(client, self, self._next_id, blueprint, transform, parent)
        self._next_id += 1
        self.actors[actor.id] = actor
        return actor

    def destroy(self, actor_id: int) -> bool:
        actor = self.actors.get(actor_id)
        if actor is None:
            return False
        if isinstance(actor, StandinSensor) and actor.is_listening():
            self.violations.append(f"sensor {actor_id} ({actor.type_id}) destroyed while listening")
        if isinstance(actor, StandinVehicle):
            for other in self.actors.values():
                if other.parent is actor:
                    self.violations.append(f"vehicle {actor_id} destroyed before its sensor {other.id}")
        del self.actors[actor_id]
        return True

    def vehicles(self) -> list[StandinVehicle]:
        return [a for a in self.actors.values() if isinstance(a, StandinVehicle)]

    def sensors(self) -> list[StandinSensor]:
        return [a for a in self.actors.values() if isinstance(a, StandinSensor)]

    # --------------------------------------------------------------------------------------------- ticking
    def tick(self, seconds: float) -> int:
        self.rpc(seconds)
        self.ticks += 1
        if self.faults.kill_at == self.ticks:
            self.kill()
            self.rpc(seconds)  # raises the time-out
        if self.ticks in self.faults.tick_timeouts:
            _time_out(seconds, self.port)
        self.frame += 1
        dt = self.settings.fixed_delta_seconds or 0.05
        self._move(dt)
        self._emit_sensor_data(dt)
        return self.frame

    def _move(self, dt: float) -> None:
        vehicles = self.vehicles()
        for v in vehicles:
            tm = self.traffic_managers.get(v.autopilot_port) if v.autopilot_port is not None else None
            if tm is None:
                v.drive(dt)
            elif tm.synchronous == self.settings.synchronous_mode:
                v.follow_lane(dt, 8.0 * (1 - tm.speed_difference_pct / 100), _blocked(v, vehicles))

    def _emit_sensor_data(self, dt: float) -> None:
        stamp = self.frame * dt
        for sensor in self.sensors():
            if not sensor.is_listening() or sensor.parent is None:
                continue
            if sensor.type_id == "sensor.camera.rgb":
                self._emit_image(sensor, stamp)
            elif sensor.type_id == "sensor.other.collision":
                for other in self._collisions_of(sensor.parent):
                    self.registry.dispatch(0.0, sensor.deliver, StandinCollisionEvent(
                        self.frame, stamp, sensor.get_transform(), sensor.parent, other, carla.Vector3D(900, 0, 0)))
            elif sensor.type_id == "sensor.other.lane_invasion":
                crossed = self._lane_change_of(sensor.parent)
                if crossed:
                    self.registry.dispatch(0.0, sensor.deliver, StandinLaneInvasionEvent(
                        self.frame, stamp, sensor.get_transform(), sensor.parent, crossed))

    def _emit_image(self, camera: StandinSensor, stamp: float) -> None:
        width, height = int(camera.attributes["image_size_x"]), int(camera.attributes["image_size_y"])
        image = StandinImage(self.frame, stamp, camera.get_transform(), width, height,
                             float(camera.attributes["fov"]), self._render(camera.parent, width, height))
        fault = self.faults.camera.get(self.ticks)
        previous = self._last_image.get(camera.id)
        self._last_image[camera.id] = image
        if fault is None:
            self.registry.dispatch(0.0, camera.deliver, image)
        elif fault.mode == "late":
            self.registry.dispatch(fault.delay_s, camera.deliver, image)
        elif fault.mode == "stale" and previous is not None:
            self.registry.dispatch(0.0, camera.deliver, previous)  # an old frame first, the right one after it
            self.registry.dispatch(fault.delay_s, camera.deliver, image)
        # "missing": nothing is sent for this frame

    def _render(self, vehicle: StandinActor, width: int, height: int) -> bytes:
        """A road seen from the vehicle: two lane lines that move with its offset and heading, plus the stamp band."""
        waypoint = self.map.get_waypoint(vehicle.get_location())
        right = waypoint.transform.get_right_vector()
        offset = (vehicle.get_location().x - waypoint.transform.location.x) * right.x + \
                 (vehicle.get_location().y - waypoint.transform.location.y) * right.y
        turned = vehicle.get_transform().rotation.yaw - waypoint.transform.rotation.yaw
        heading = math.radians((turned + 180) % 360 - 180)
        gray = np.full((height, width), 90, dtype=np.uint8)
        band = height // 4
        gray[:band] = stamp_value(self.frame)
        near = (np.arange(band, height) - band + 1) / (height - band)
        cols = np.arange(width)[None, :]
        for edge in (-LANE_WIDTH / 2, LANE_WIDTH / 2):
            centre = width / 2 + (edge - offset) * width / 8 * (0.3 + 0.7 * near) - heading * (1 - near) * width / 2
            gray[band:][np.abs(cols - centre[:, None]) < 1.5] = 230
        bgra = np.empty((height, width, 4), dtype=np.uint8)
        bgra[..., :3] = gray[..., None]
        bgra[..., 3] = 255
        return bgra.tobytes()

    def _collisions_of(self, vehicle: StandinActor) -> list[StandinActor]:
        others = [v for v in self.vehicles() if v is not vehicle]
        hits = [v for v in others if v.get_location().distance(vehicle.get_location()) < 2.2]
        if self.ticks in self.faults.collisions and not hits and others:
            hits = [min(others, key=lambda v: v.get_location().distance(vehicle.get_location()))]
        return hits

    def _lane_change_of(self, vehicle: StandinVehicle) -> list[Any]:
        location = vehicle.get_location()
        on_road = self.map.get_waypoint(location, project_to_road=False)
        nearest = self.map.get_waypoint(location)
        lane = (nearest.lane_id, int(on_road is not None))
        previous, vehicle._lane = vehicle._lane, lane
        if previous is None or previous == lane:
            return []
        right = nearest.transform.get_right_vector()
        to_right = (location.x - nearest.transform.location.x) * right.x + \
                   (location.y - nearest.transform.location.y) * right.y > 0
        return [nearest.right_lane_marking if to_right else nearest.left_lane_marking]


def _blocked(vehicle: StandinVehicle, vehicles: list[StandinVehicle]) -> bool:
    here, yaw = vehicle.get_location(), math.radians(vehicle.get_transform().rotation.yaw)
    for other in vehicles:
        if other is vehicle:
            continue
        dx, dy = other.get_location().x - here.x, other.get_location().y - here.y
        ahead = dx * math.cos(yaw) + dy * math.sin(yaw)
        side = -dx * math.sin(yaw) + dy * math.cos(yaw)
        if 0 < ahead < 8.0 and abs(side) < 1.5:
            return True
    return False


def _time_out(seconds: float, port: int) -> None:
    """What the wheel does when the server does not answer: wait out the time-out, then raise this RuntimeError."""
    time.sleep(seconds)
    raise RuntimeError(f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the "
                       f"simulator is ready and connected to 127.0.0.1:{port}")


def _port_held(port: int) -> bool:
    """Whether a process listens on ``port``; by a bind attempt, which (unlike connecting) never waits."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# ------------------------------------------------------------------------------------------------- client
class StandinClient:
    """``carla.Client`` with the 0.9.16 signatures; bound to a registry by ``StandinRegistry.client_class``."""

    registry: StandinRegistry

    def __init__(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self.host, self.port = host, port
        self.timeout_s = 5.0  # the wheel's default
        self.registry.clients_created += 1

    def _server(self) -> StandinServer:
        """The server this client talks to, after one RPC's worth of reachability check."""
        server = self.registry.servers.get(self.port)
        if server is None or self.host not in ("localhost", "127.0.0.1"):
            _time_out(self.timeout_s, self.port)
        server.rpc(self.timeout_s)
        return server

    def set_timeout(self, seconds: float) -> None:
        self.timeout_s = float(seconds)

    def get_client_version(self) -> str:
        return SERVER_VERSION

    def get_server_version(self) -> str:
        self._server()
        return SERVER_VERSION

    def get_world(self) -> StandinWorld:
        return StandinWorld(self, self._server())

    def get_available_maps(self) -> list[str]:
        return [f"/Game/Carla/Maps/{t}" for t in self._server().towns]

    def load_world(self, map_name: str, reset_settings: bool = True, map_layers: Any = None) -> StandinWorld:
        server = self._server()
        town = map_name.split("/")[-1]
        if town not in server.towns:
            raise RuntimeError(f"map '{map_name}' not found")
        server.load(town)
        return StandinWorld(self, server)

    def get_trafficmanager(self, port: int = 8000) -> StandinTrafficManager:
        server = self._server()
        if port in server.traffic_managers:
            return server.traffic_managers[port]
        self.registry.bind_traffic_manager(port)
        tm = StandinTrafficManager(self, server, port)
        server.traffic_managers[port] = tm
        return tm

    def apply_batch_sync(self, commands: list[Any], do_tick: bool = False) -> list[StandinResponse]:
        server = self._server()
        responses, batch = [], []
        for command in commands:
            if not isinstance(command, carla.command.DestroyActor):
                raise TypeError(f"the stand-in applies only carla.command.DestroyActor, got {type(command).__name__}")
            actor = server.actors.get(command.actor_id)
            batch.append((command.actor_id, actor.type_id if actor else "?"))
            ok = server.destroy(command.actor_id)
            responses.append(StandinResponse(command.actor_id, "" if ok else f"actor {command.actor_id} not found"))
        server.destroy_batches.append(batch)
        if do_tick and server.settings.synchronous_mode:
            server.tick(self.timeout_s)
        return responses

    def apply_batch(self, commands: list[Any], do_tick: bool = False) -> None:
        self.apply_batch_sync(commands, do_tick)


# ------------------------------------------------------------------------------------------------- registry
class StandinRegistry:
    """The stand-in servers of one test, by port; plus this "process's" Traffic Manager sockets and the thread
    that delivers sensor data."""

    def __init__(self) -> None:
        self.servers: dict[int, StandinServer] = {}
        self.tm_sockets: dict[int, socket.socket] = {}
        self.clients_created = 0
        self.client_class = type("Client", (StandinClient,), {"registry": self})
        self._queue: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._deliver, name="standin-sensors", daemon=True)
        self._thread.start()

    def add_server(self, port: int, **kwargs: Any) -> StandinServer:
        self.servers[port] = StandinServer(self, port, **kwargs)
        return self.servers[port]

    def bind_traffic_manager(self, port: int) -> None:
        """A Traffic Manager's RPC server binds its port, as CARLA's does; one per port per process."""
        if port in self.tm_sockets:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            sock.close()
            raise RuntimeError("trying to create rpc server for traffic manager; but the system failed to create "
                               "because of bind error.") from None
        sock.listen(1)
        self.tm_sockets[port] = sock

    def dispatch(self, delay_s: float, callback: Callable[[Any], None], data: Any) -> None:
        with self._wake:
            self._seq += 1
            heapq.heappush(self._queue, (time.monotonic() + delay_s, self._seq, callback, data))
            self._wake.notify()

    def _deliver(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._queue or self._queue[0][0] > time.monotonic()):
                    self._wake.wait(None if not self._queue else self._queue[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, callback, data = heapq.heappop(self._queue)
            callback(data)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(5)
        for sock in self.tm_sockets.values():
            sock.close()
        self.tm_sockets.clear()


# ------------------------------------------------------------------------------------------------- script mode
def _listen_forever(port: int, pidfile: str | None, fail_if_exists: str | None) -> None:
    """The "server process" of the restart tests: holds ``port`` open until terminated; or, while the file
    ``fail_if_exists`` exists, a broken server that exits at once with code 3."""
    if fail_if_exists and os.path.exists(fail_if_exists):
        if pidfile:
            with open(pidfile, "a") as f:
                f.write("failed\n")
        sys.exit(3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    while True:
        conn, _ = sock.accept()
        conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--pidfile")
    parser.add_argument("--fail-if-exists")
    args = parser.parse_args()
    _listen_forever(args.listen, args.pidfile, args.fail_if_exists)
