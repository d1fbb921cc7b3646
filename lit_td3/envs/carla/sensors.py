"""The ego's sensors: spawning them, matching their data to the tick's frame, and turning images into frames.

CARLA delivers sensor data on the client's own threads, after ``world.tick()`` has returned. The camera streams one
image per frame, so ``SensorRig.read(frame)`` waits for exactly that frame's image: older images are stale and
dropped, and none within ``sensors.timeout_s`` raises ``SensorTimeoutError`` naming the sensor and the frame. The
collision and lane-invasion sensors fire only when something happens; their events are collected and handed out by
frame number after the camera's image for the frame has arrived (the server sends a frame's data together), so an
event is never attributed to an earlier step, and one that arrives even later counts in the next step.

This module never decides what a fault does to the episode; that is the env's job.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from lit_td3.envs.carla.config import SensorsConfig

FRAME_SIZE = 84
"""Side of the grayscale frames in the observation."""


class SensorTimeoutError(RuntimeError):
    """A sensor's data for a tick's frame did not arrive in time. Constructible from one message string."""


# ------------------------------------------------------------------------------------------------- images
def bgra_to_rgb(raw: Any, width: int, height: int) -> np.ndarray:
    """``carla.Image.raw_data`` (BGRA bytes, row-major) as an H×W×3 uint8 RGB array."""
    bgra = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 4)
    return bgra[:, :, 2::-1]


def to_gray_frame(rgb: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """RGB → luma (ITU-R BT.601 weights) → ``size``×``size`` by bilinear sampling at pixel centres, as uint8.

    At an integer downscale factor of 2 (the default 168 → 84) each output pixel is the mean of a 2×2 block.
    """
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = _resize_rows(_resize_rows(gray, size).T, size).T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize_rows(a: np.ndarray, n_out: int) -> np.ndarray:
    """Linear interpolation along the first axis, sampling ``n_out`` pixel centres."""
    n_in = a.shape[0]
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    w = (pos - low).astype(np.float32)[:, None]
    return a[low] * (1 - w) + a[high] * w


# ------------------------------------------------------------------------------------------------- frame matching
class FrameMatcher:
    """Callback target of a streaming sensor; hands out the data of one requested frame, never an older one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue()
        self.last_frame: int | None = None

    def __call__(self, data: Any) -> None:
        self._queue.put(data)

    def wait_for(self, frame: int, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                data = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise SensorTimeoutError(
                    f"sensor '{self.name}' delivered no data for frame {frame} within {timeout_s:g} s "
                    f"(last frame received: {self.last_frame})"
                ) from None
            self.last_frame = data.frame
            if data.frame == frame:
                return data
            if data.frame > frame:
                raise SensorTimeoutError(
                    f"sensor '{self.name}' delivered frame {data.frame} while frame {frame} was awaited: the world "
                    "ticked without this client (another client in synchronous mode?)"
                )
            # data.frame < frame: stale data of an earlier tick, dropped.


class EventLog:
    """Callback target of an event sensor (collision, lane invasion); events are taken by frame."""

    def __init__(self) -> None:
        self._events: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        with self._lock:
            self._events.append(event)

    def take(self, up_to_frame: int) -> list[Any]:
        with self._lock:
            taken = [e for e in self._events if e.frame <= up_to_frame]
            self._events = [e for e in self._events if e.frame > up_to_frame]
        return taken


# ------------------------------------------------------------------------------------------------- the rig
@dataclass
class SensorReading:
    """What the sensors said about one frame."""

    rgb: np.ndarray
    collisions: list[Any]
    lane_invasions: list[Any]


class SensorRig:
    """Front RGB camera, collision sensor and lane-invasion sensor attached to the ego."""

    def __init__(self, carla: ModuleType, world: Any, ego: Any, config: SensorsConfig,
                 spawn: Callable[[Any, Any, Any], Any], role_name: str) -> None:
        """``spawn(blueprint, transform, parent)`` spawns an actor and records it for cleanup."""
        self.config = config
        library = world.get_blueprint_library()
        cam = config.camera
        camera_bp = _blueprint(library, "sensor.camera.rgb", role_name, image_size_x=cam.width,
                               image_size_y=cam.height, fov=cam.fov, sensor_tick=0.0)
        mount = carla.Transform(carla.Location(x=cam.x, z=cam.z), carla.Rotation(pitch=cam.pitch))
        self.camera = spawn(camera_bp, mount, ego)
        self.collision = spawn(_blueprint(library, "sensor.other.collision", role_name), carla.Transform(), ego)
        self.lane = spawn(_blueprint(library, "sensor.other.lane_invasion", role_name), carla.Transform(), ego)
        self.images = FrameMatcher("camera (sensor.camera.rgb)")
        self.collisions = EventLog()
        self.lane_invasions = EventLog()
        self.camera.listen(self.images)
        self.collision.listen(self.collisions)
        self.lane.listen(self.lane_invasions)

    @property
    def sensors(self) -> list[Any]:
        return [self.camera, self.collision, self.lane]

    def read(self, frame: int) -> SensorReading:
        """The camera image of ``frame`` and the events up to it; raises ``SensorTimeoutError``."""
        image = self.images.wait_for(frame, self.config.timeout_s)
        rgb = bgra_to_rgb(image.raw_data, image.width, image.height).copy()
        return SensorReading(rgb, self.collisions.take(frame), self.lane_invasions.take(frame))

    def stop(self) -> None:
        """Stops the callbacks (before the actors are destroyed, so none fires into a closed env); idempotent."""
        for sensor in self.sensors:
            if sensor.is_listening():
                sensor.stop()


def _blueprint(library: Any, blueprint_id: str, role_name: str, **attributes: float) -> Any:
    bp = library.find(blueprint_id)  # the three sensor blueprints exist in every CARLA 0.9.x
    if bp.has_attribute("role_name"):
        bp.set_attribute("role_name", role_name)
    for key, value in attributes.items():
        bp.set_attribute(key, str(value))
    return bp
