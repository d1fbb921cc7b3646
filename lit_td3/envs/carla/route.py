"""The ego's route: waypoints from CARLA's map API, and where the ego stands relative to them.

``Route.from_map`` follows ``waypoint.next(spacing)`` from the ego's spawn point for the configured length, taking
the straightest branch at junctions. ``RouteTracker`` projects the ego onto the route every step, giving progress
along it, the signed lateral offset from the centre of the route's lane, the heading error and the distances to the
next waypoints. Pure geometry in numpy; no simulator calls after the route is built, and no reward decisions.

Coordinates are CARLA's (left-handed: x forward at yaw 0, y to the right, yaw in degrees on the wire, radians here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lit_td3.envs.carla.config import RouteConfig


def wrap_angle(rad: float) -> float:
    """Angle in [-pi, pi)."""
    return (rad + math.pi) % (2 * math.pi) - math.pi


@dataclass(frozen=True)
class Route:
    xy: np.ndarray
    """Waypoint positions, N×2 (m)."""
    s: np.ndarray
    """Arc length at each waypoint, N (m); ``s[0] == 0``."""
    lane_width: np.ndarray
    """Lane width at each waypoint, N (m)."""

    @property
    def length_m(self) -> float:
        return float(self.s[-1])

    @classmethod
    def from_map(cls, carla_map: Any, start: Any, config: RouteConfig) -> Route:
        """The route from the driving-lane waypoint nearest to ``start`` (a ``carla.Location``)."""
        waypoint = carla_map.get_waypoint(start)
        if waypoint is None:
            raise RuntimeError(f"no driving lane near the ego's spawn point {start}")
        waypoints = [waypoint]
        travelled = 0.0
        while travelled < config.length_m:
            branches = waypoint.next(config.spacing_m)
            if not branches:
                break  # the road ends: a shorter route
            previous = waypoint
            waypoint = min(branches, key=lambda b: abs(wrap_angle(math.radians(
                b.transform.rotation.yaw - previous.transform.rotation.yaw))))
            waypoints.append(waypoint)
            # ``next`` steps along the road's reference line: a lane on the outside of a bend is longer
            travelled += waypoint.transform.location.distance(previous.transform.location)
        if len(waypoints) < 2:
            raise RuntimeError(f"the road ends at the ego's spawn point {start}: no route to follow")
        return cls.from_points(
            [(w.transform.location.x, w.transform.location.y) for w in waypoints],
            [w.lane_width for w in waypoints],
        )

    @classmethod
    def from_points(cls, xy: Any, lane_width: Any) -> Route:
        points = np.asarray(xy, dtype=np.float64)
        steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
        return cls(points, np.concatenate([[0.0], np.cumsum(steps)]), np.asarray(lane_width, dtype=np.float64))


@dataclass(frozen=True)
class RoutePosition:
    """The ego relative to the route at one step."""

    s: float
    """Arc length of the ego's projection onto the route (m)."""
    lateral_m: float
    """Signed distance from the route's lane centre (m), positive to the right of the driving direction."""
    heading_error_rad: float
    """Ego yaw minus the route's direction at the projection, in [-pi, pi); positive: pointing to the right."""
    lane_width_m: float
    """Width of the route's lane at the projection (m)."""
    waypoint_distances_m: np.ndarray
    """Euclidean distances from the ego to the next waypoints ahead of the projection (m); the last waypoint
    repeats once the route runs out."""


class RouteTracker:
    """Projects the ego onto the route, searching forward from its last segment so loops never confuse it."""

    def __init__(self, route: Route, lookahead: int, window: int = 16) -> None:
        self.route = route
        self.lookahead = lookahead
        self.window = window
        self.segment = 0

    def locate(self, x: float, y: float, yaw_rad: float) -> RoutePosition:
        route, p = self.route, np.array([x, y])
        first = max(self.segment - 2, 0)
        last = min(self.segment + self.window, len(route.xy) - 2)
        a = route.xy[first:last + 1]
        d = route.xy[first + 1:last + 2] - a
        length2 = np.einsum("ij,ij->i", d, d)
        t = np.clip(np.einsum("ij,ij->i", p - a, d) / length2, 0.0, 1.0)
        gap = np.linalg.norm(a + t[:, None] * d - p, axis=1)
        k = int(np.argmin(gap))
        self.segment = i = first + k
        seg, ti, seg_len = d[k], float(t[k]), math.sqrt(float(length2[k]))
        right = np.array([-seg[1], seg[0]]) / seg_len  # CARLA's y points right of x
        ahead = np.minimum(np.arange(i + 1, i + 1 + self.lookahead), len(route.xy) - 1)
        return RoutePosition(
            s=float(route.s[i] + ti * seg_len),
            lateral_m=float(np.dot(p - (a[k] + ti * seg), right)),
            heading_error_rad=wrap_angle(yaw_rad - math.atan2(seg[1], seg[0])),
            lane_width_m=float(route.lane_width[i] + ti * (route.lane_width[i + 1] - route.lane_width[i])),
            waypoint_distances_m=np.linalg.norm(route.xy[ahead] - p, axis=1),
        )
