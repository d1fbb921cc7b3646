"""CARLA 0.9.16 lane keeping for lit_td3 (GitHub issue 3): the env, and the errors a trainer may need to catch.

Importing this package never imports the ``carla`` client; the env does that on its first ``reset()``.
"""

from lit_td3.envs.carla.env import CarlaLaneKeepingEnv
from lit_td3.envs.carla.sensors import SensorTimeoutError
from lit_td3.envs.carla.server import (
    ServerNotRunningError,
    SimulatorUnavailableError,
    TrafficManagerPortError,
)
from lit_td3.envs.carla.world import ScenarioError

__all__ = [
    "CarlaLaneKeepingEnv",
    "ScenarioError",
    "SensorTimeoutError",
    "ServerNotRunningError",
    "SimulatorUnavailableError",
    "TrafficManagerPortError",
]
