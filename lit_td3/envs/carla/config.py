"""Typed, validated settings of the CARLA lane-keeping env, built from the plain dicts of ``data.env_kwargs``.

Every bad value (unknown key, wrong type, out of range) raises ``ConfigError`` naming its full field path, e.g.
``data.env_kwargs.reward.progress.weight=-1.0: expected a non-negative weight``, when the env is constructed and
before anything touches the network. This module never imports ``carla`` and never opens a socket.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from lit_td3.config import ConfigError, check

ROOT = "data.env_kwargs"
"""Where these settings live in a lit_td3 config; error messages name fields from here."""

WEATHER_PRESETS = (
    "ClearNight", "ClearNoon", "ClearSunset", "CloudyNight", "CloudyNoon", "CloudySunset", "Default", "DustStorm",
    "HardRainNight", "HardRainNoon", "HardRainSunset", "MidRainSunset", "MidRainyNight", "MidRainyNoon",
    "SoftRainNight", "SoftRainNoon", "SoftRainSunset", "WetCloudyNight", "WetCloudyNoon", "WetCloudySunset",
    "WetNight", "WetNoon", "WetSunset",
)
"""The ``carla.WeatherParameters`` presets of the 0.9.16 client (a test checks this list against the wheel)."""

T = TypeVar("T")


def rule(ok: Callable[[Any], bool], expected: str) -> dict[str, Any]:
    """Field metadata: the validity rule of a setting, kept next to it; the builder checks it with the field's path."""
    return {"rule": (ok, expected)}


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _tcp_port(value: int) -> bool:
    return 1 <= value <= 65535


# ------------------------------------------------------------------------------------------------- server
@dataclass(frozen=True)
class RestartConfig:
    """How hard the env tries to get a simulator back after a fault, before it gives up."""

    attempts: int = field(default=3, metadata=rule(lambda v: v >= 1, "at least 1"))
    """Consecutive failed recovery attempts (reconnect, restart, rebuild the world) before SimulatorUnavailableError."""
    backoff_s: float = field(default=2.0, metadata=rule(_non_negative, "non-negative seconds"))
    """Wait before the first retry; each further retry waits ``backoff_factor`` times longer."""
    backoff_factor: float = field(default=2.0, metadata=rule(lambda v: v >= 1, "at least 1"))
    """Growth of the wait between retries."""
    backoff_max_s: float = field(default=60.0, metadata=rule(_non_negative, "non-negative seconds"))
    """Longest wait between two retries."""
    max_recoveries: int = field(default=100, metadata=rule(lambda v: v >= 0, "a non-negative count"))
    """Recoveries allowed over the env's whole life: a server that keeps dying ends the run instead of limping on."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the CARLA server is, how long to wait for it, and how to (re)start it."""

    host: str = field(default="localhost", metadata=rule(lambda v: v != "", "a host name or address"))
    """Host of the CARLA server."""
    port: int = field(default=2000, metadata=rule(_tcp_port, "a TCP port in 1..65535"))
    """RPC port of env 0's server (``-carla-rpc-port``); env i uses ``port + port_stride * i``."""
    port_stride: int = field(
        default=4, metadata=rule(lambda v: v >= 3, "at least 3 (a server uses its RPC port and the next two)"))
    """Port offset between the servers of consecutive env indices (the server also uses RPC port + 1 and + 2)."""
    timeout_s: float = field(default=10.0, metadata=rule(_positive, "positive seconds"))
    """RPC time-out of the client; also how long the first connection waits before the clear no-server error."""
    tick_timeout_s: float = field(default=10.0, metadata=rule(_positive, "positive seconds"))
    """Longest wait for one synchronous ``world.tick``; longer ends the episode as a fault."""
    load_world_timeout_s: float = field(default=120.0, metadata=rule(_positive, "positive seconds"))
    """Longest wait for ``load_world`` (loading a town takes tens of seconds)."""
    tm_port: int = field(default=8000, metadata=rule(_tcp_port, "a TCP port in 1..65535"))
    """Traffic Manager port of env 0; env i uses ``tm_port + port_stride * i``."""
    tm_port_in_use: Literal["pick_free", "fail"] = "pick_free"
    """When another process holds the Traffic Manager port: take a free port (logged), or fail naming the port."""
    command: tuple[str, ...] | None = field(
        default=None, metadata=rule(lambda v: v is None or len(v) > 0, "null or a non-empty command line"))
    """Command that starts a server, with ``{port}`` and ``{env_index}`` filled in, e.g. ``[/opt/carla/CarlaUE4.sh,
    -RenderOffScreen, "-carla-rpc-port={port}"]``. When set, the env launches it if nothing answers on the port and
    restarts it after a crash; when null, the env only reconnects to a server someone else keeps running."""
    startup_timeout_s: float = field(default=120.0, metadata=rule(_positive, "positive seconds"))
    """Longest wait for a launched server to open its RPC port."""
    stop_on_close: bool = True
    """Stop the server process the env launched when the env closes."""
    log_dir: str | None = None
    """Folder for the launched server's stdout/stderr (``carla_server_<port>.log``); null: the system temp folder."""
    restart: RestartConfig = field(default_factory=RestartConfig)
    """Retry budget after faults."""

    def rpc_port(self, env_index: int) -> int:
        return self.port + self.port_stride * env_index

    def traffic_manager_port(self, env_index: int) -> int:
        return self.tm_port + self.port_stride * env_index


# ------------------------------------------------------------------------------------------------- scenario
@dataclass(frozen=True)
class RouteConfig:
    """The waypoint route the ego follows, generated from its spawn point with CARLA's map API."""

    length_m: float = field(default=500.0, metadata=rule(_positive, "positive metres"))
    """Route length; reaching its end completes the route. Shorter if the road ends first."""
    spacing_m: float = field(default=3.0, metadata=rule(lambda v: 0.5 <= v <= 20.0, "metres in 0.5..20"))
    """Distance between consecutive route waypoints (``waypoint.next(spacing_m)``)."""
    lookahead_waypoints: int = field(default=5, metadata=rule(lambda v: 1 <= v <= 50, "1..50 waypoints"))
    """How many upcoming waypoints' distances go into the observation vector."""


@dataclass(frozen=True)
class NpcConfig:
    """The vehicles on autopilot around the ego, driven by the Traffic Manager."""

    count: int = field(default=20, metadata=rule(_non_negative, "a non-negative count"))
    """Vehicles to spawn (fewer when the town has too few free spawn points; that is logged)."""
    blueprint_filter: str = field(
        default="vehicle.*", metadata=rule(lambda v: v.startswith("vehicle."), "a 'vehicle.*' pattern"))
    """Blueprint wildcard; only four-wheeled vehicles are used."""
    min_distance_m: float = field(default=15.0, metadata=rule(_non_negative, "non-negative metres"))
    """No NPC spawns closer than this to the ego's spawn point."""
    speed_difference_pct: float = field(
        default=30.0, metadata=rule(lambda v: -100 <= v <= 100, "a percentage in -100..100"))
    """Traffic Manager speed below the speed limit, in percent (negative drives faster)."""
    distance_to_leading_m: float = field(default=2.5, metadata=rule(_non_negative, "non-negative metres"))
    """Gap the Traffic Manager keeps to the vehicle ahead."""


@dataclass(frozen=True)
class ScenarioConfig:
    """Scenario as data: town, start, route, traffic, weather and seed ("scenario 0" of the original report)."""

    town: str = field(default="Town01", metadata=rule(lambda v: v != "", "a town name such as 'Town01'"))
    """Map to load (skipped when it is already loaded)."""
    spawn_point: int = field(default=0, metadata=rule(_non_negative, "an index into the town's spawn points"))
    """Ego start: index into ``world.get_map().get_spawn_points()``."""
    ego_blueprint: str = field(
        default="vehicle.tesla.model3", metadata=rule(lambda v: v.startswith("vehicle."), "a 'vehicle.*' id"))
    """Blueprint of the ego vehicle."""
    route: RouteConfig = field(default_factory=RouteConfig)
    npc: NpcConfig = field(default_factory=NpcConfig)
    weather: str = field(
        default="ClearNoon", metadata=rule(lambda v: v in WEATHER_PRESETS, f"one of {', '.join(WEATHER_PRESETS)}"))
    """A ``carla.WeatherParameters`` preset."""
    seed: int = 0
    """Seed of the first episode when ``reset`` gets none (env i uses ``seed + i``): NPC choice and Traffic Manager."""
    fixed_delta_s: float = field(
        default=0.05, metadata=rule(lambda v: 0 < v <= 0.1, "seconds in (0, 0.1] (CARLA's physics sub-steps)"))
    """Simulated time per synchronous tick (0.05 s = 20 Hz)."""
    warmup_ticks: int = field(default=10, metadata=rule(_non_negative, "a non-negative count"))
    """Ticks after spawning, with the brake on, before the first observation (the car drops onto the road)."""


# ------------------------------------------------------------------------------------------------- sensors
@dataclass(frozen=True)
class CameraConfig:
    """The front RGB camera; its image becomes one 84×84 grayscale frame."""

    width: int = field(default=168, metadata=rule(lambda v: 84 <= v <= 1920, "pixels in 84..1920"))
    height: int = field(default=168, metadata=rule(lambda v: 84 <= v <= 1080, "pixels in 84..1080"))
    fov: float = field(default=90.0, metadata=rule(lambda v: 10 <= v <= 170, "degrees in 10..170"))
    x: float = 1.5
    """Forward offset from the vehicle origin (m)."""
    z: float = 2.4
    """Height above the vehicle origin (m)."""
    pitch: float = field(default=-10.0, metadata=rule(lambda v: -90 <= v <= 90, "degrees in -90..90"))


@dataclass(frozen=True)
class SensorsConfig:
    camera: CameraConfig = field(default_factory=CameraConfig)
    timeout_s: float = field(default=2.0, metadata=rule(_positive, "positive seconds"))
    """Longest wait for the camera's image of a tick's frame; longer ends the episode as a fault naming the frame."""


# ------------------------------------------------------------------------------------------------- reward
WEIGHT = rule(_non_negative, "a non-negative weight (each term carries its own sign)")


@dataclass(frozen=True)
class TermConfig:
    weight: float = field(default=1.0, metadata=WEIGHT)


@dataclass(frozen=True)
class SpeedTermConfig:
    weight: float = field(default=0.3, metadata=WEIGHT)
    target_mps: float = field(default=8.33, metadata=rule(_positive, "a positive speed in m/s"))
    """Speed the term rewards most (8.33 m/s = 30 km/h)."""


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the named reward terms (formulas in ``reward.py``); a weight of 0 switches a term off."""

    progress: TermConfig = field(default_factory=lambda: TermConfig(weight=1.0))
    lane_centre: TermConfig = field(default_factory=lambda: TermConfig(weight=0.3))
    speed: SpeedTermConfig = field(default_factory=SpeedTermConfig)
    collision: TermConfig = field(default_factory=lambda: TermConfig(weight=100.0))
    lane_invasion: TermConfig = field(default_factory=lambda: TermConfig(weight=50.0))
    comfort: TermConfig = field(default_factory=lambda: TermConfig(weight=0.1))


@dataclass(frozen=True)
class TerminationConfig:
    on_collision: bool = True
    on_lane_invasion: bool = True
    on_route_complete: bool = True
    """Reaching the end of the route ends the episode (terminated: the goal is absorbing)."""


# ------------------------------------------------------------------------------------------------- all of it
@dataclass(frozen=True)
class CarlaEnvConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    sensors: SensorsConfig = field(default_factory=SensorsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    termination: TerminationConfig = field(default_factory=TerminationConfig)
    max_episode_steps: int = field(default=500, metadata=rule(lambda v: v >= 1, "at least 1"))
    """Truncation length (500 in production)."""

    @classmethod
    def from_kwargs(cls, env_index: int, **groups: Any) -> CarlaEnvConfig:
        """Builds and validates everything, including the ports env ``env_index`` will use."""
        check("env_index", env_index, type(env_index) is int and env_index >= 0, "a non-negative integer")
        config = build(cls, groups, ROOT)
        server = config.server
        check(f"{ROOT}.server.port", server.port, server.rpc_port(env_index) + 2 <= 65535,
              f"a port that leaves room for env_index={env_index} (port + port_stride * env_index + 2 <= 65535)")
        check(f"{ROOT}.server.tm_port", server.tm_port, server.traffic_manager_port(env_index) <= 65535,
              f"a port that leaves room for env_index={env_index} (tm_port + port_stride * env_index <= 65535)")
        if server.command is not None:
            _check_command(server.command, server.rpc_port(env_index), env_index)
        return config


def _check_command(command: tuple[str, ...], port: int, env_index: int) -> None:
    for i, part in enumerate(command):
        try:
            part.format(port=port, env_index=env_index)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"{ROOT}.server.command[{i}]={part!r}: expected text whose only placeholders are {{port}} and "
                f"{{env_index}} ({err!r})"
            ) from None


# ------------------------------------------------------------------------------------------------- builder
def build(cls: type[T], data: Any, path: str) -> T:
    """Builds dataclass ``cls`` from a mapping, checking keys, types and rules; errors name ``path.field``."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    check(path, data, isinstance(data, Mapping), f"a mapping with keys from {names}")
    for key in data:
        if key not in names:
            raise ConfigError(f"{path}.{key}={data[key]!r}: unknown setting; {path} takes {names}")
    hints = get_type_hints(cls)
    obj = cls(**{key: _convert(hints[key], value, f"{path}.{key}") for key, value in data.items()})
    for f in fields(cls):  # type: ignore[arg-type]
        ok, expected = f.metadata.get("rule", (None, ""))
        value = getattr(obj, f.name)
        if ok is not None and f.name in data:  # defaults are valid by construction
            check(f"{path}.{f.name}", value, ok(value), expected)
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and is_dataclass(tp):
        return build(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is Literal:
        check(path, value, value in args, f"one of {list(args)}")
        return value
    if origin is tuple:
        check(path, value, isinstance(value, (list, tuple)), "a list")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        check(path, value, isinstance(value, bool), "true or false")
    elif tp is int:
        check(path, value, isinstance(value, int) and not isinstance(value, bool), "an integer")
    elif tp is float:
        check(path, value, isinstance(value, (int, float)) and not isinstance(value, bool), "a number")
        check(path, value, math.isfinite(value), "a finite number")
        return float(value)
    elif tp is str:
        check(path, value, isinstance(value, str), "a string")
    else:  # pragma: no cover - a field type this builder was not written for is a programming error
        raise TypeError(f"{path}: unsupported setting type {tp!r}")
    return value

