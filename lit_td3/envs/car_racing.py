"""gymnasium's CarRacing-v3, rendered faster: the same frames, bit for bit.

CarRacing draws every observation with pygame, and most of a step went to two things:

- ``_render_road``: for each of ~720 quads (400 grass patches, ~320 road and kerb tiles) it rotates, scales and
  bounds-checks four vertices in Python, then draws the few dozen that are on screen. Here the vertices of all quads
  are kept in one array per track, the same float64 arithmetic runs on all of them at once, and the same pygame calls
  draw the same on-screen quads in the same order.
- ``_render`` loads the score's font from disk for every frame (about 0.6 ms); here it is loaded once per env.

``tests/test_car_racing.py`` compares every observation with the stock env's, frame by frame (run under gymnasium
1.1.1 and 1.4.0). A gymnasium whose road-drawing code differs from the code re-implemented here gets its own renderer
back, with a warning (``make``): the env stays gymnasium's, only slower.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium
import numpy as np
import pygame
from gymnasium.envs.box2d import car_racing
from pygame import gfxdraw

VERIFIED_SOURCES = {
    "_render_road": "ececdf992df950f91fc6121dc19ac61650c98da19c67391e72b4c03aee4c3dda",
    "_draw_colored_polygon": "8ab3784d359ee5577b7e73754b7149ce5cfb34edc85a80a364e65fa69201bea2",
}
"""SHA-256 of the source of the gymnasium methods that ``CarRacing._render_road`` re-implements, the same in
gymnasium 1.1.1 and 1.4.0."""


@functools.cache
def renderer_verified() -> bool:
    """Whether the installed gymnasium draws its road with the code ``CarRacing`` re-implements (same source)."""
    try:
        sources = {name: inspect.getsource(getattr(car_racing.CarRacing, name)) for name in VERIFIED_SOURCES}
    except (OSError, TypeError):  # no source to compare (a build without .py files)
        return False
    return all(hashlib.sha256(sources[name].encode()).hexdigest() == digest
               for name, digest in VERIFIED_SOURCES.items())


def make(**kwargs: Any) -> car_racing.CarRacing:
    """The entry point of ``lit_td3/CarRacing-v3``: the faster renderer, or gymnasium's own where the installed
    gymnasium draws its road differently from the code it was checked against."""
    if renderer_verified():
        return CarRacing(**kwargs)
    warnings.warn(f"gymnasium {gymnasium.__version__} draws CarRacing's road with code that lit_td3/CarRacing-v3 was "
                  "not checked against: it runs gymnasium's own, slower renderer", stacklevel=2)
    return car_racing.CarRacing(**kwargs)


def grass_quads() -> np.ndarray:
    """The grass patches' corners, (400, 4, 2), in the order and with the values ``CarRacing._render_road`` uses."""
    dim = car_racing.GRASS_DIM
    return np.array([[(dim * x + dim, dim * y), (dim * x, dim * y), (dim * x, dim * y + dim),
                      (dim * x + dim, dim * y + dim)]
                     for x in range(-20, 20, 2) for y in range(-20, 20, 2)], dtype=np.float64)


class CarRacing(car_racing.CarRacing):
    """CarRacing-v3 with a vectorized ``_render_road`` and a loaded font; dynamics, rewards, spaces and frames are the
    stock env's."""

    _GRASS = grass_quads()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fonts: dict[tuple[Any, ...], pygame.font.Font] = {}

    def _render(self, mode: str) -> Any:
        # gymnasium's _render calls pygame.font.Font itself; for its duration that name returns this env's loaded
        # font. Only the env uses pygame, from the one thread that steps it, so nothing else can see the swap. The
        # fonts are the env's, not the process's: closing a "human" env quits pygame, which invalidates its fonts.
        font_class = pygame.font.Font

        def loaded_font(*args: Any) -> pygame.font.Font:
            if args not in self._fonts:
                self._fonts[args] = font_class(*args)
            return self._fonts[args]

        pygame.font.Font = loaded_font
        try:
            return super()._render(mode)
        finally:
            pygame.font.Font = font_class

    def _create_track(self) -> bool:
        created = super()._create_track()
        if created:
            # Tiles keep their own color arrays (a visited tile is recolored in place), so only corners are cached.
            self._road_quads = np.array([quad for quad, _ in self.road_poly], dtype=np.float64)
        return created

    def _render_road(self, zoom: float, translation: tuple[float, float], angle: float) -> None:
        bounds = car_racing.PLAYFIELD
        field = [(bounds, bounds), (bounds, -bounds), (-bounds, -bounds), (-bounds, bounds)]
        self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)
        # pygame's own rotation of the unit vectors gives exactly the cos/sin its Vector2.rotate_rad applies.
        cos, sin = pygame.math.Vector2(1.0, 0.0).rotate_rad(angle)
        grass = self._on_screen(self._GRASS, cos, sin, zoom, translation)
        road = self._on_screen(self._road_quads, cos, sin, zoom, translation)
        for _, quad in grass:
            self._fill(quad, self.grass_color)
        for i, quad in road:
            self._fill(quad, [int(c) for c in self.road_poly[i][1]])

    @staticmethod
    def _on_screen(quads: np.ndarray, cos: float, sin: float, zoom: float,
                   translation: tuple[float, float]) -> list[tuple[int, list[list[float]]]]:
        """(index, screen corners) of the quads that ``_draw_colored_polygon`` would draw, in their order."""
        x, y = quads[..., 0], quads[..., 1]
        screen = np.stack([(cos * x - sin * y) * zoom + translation[0],
                           (sin * x + cos * y) * zoom + translation[1]], axis=-1)
        margin = car_racing.MAX_SHAPE_DIM
        inside = ((screen[..., 0] >= -margin) & (screen[..., 0] <= car_racing.WINDOW_W + margin)
                  & (screen[..., 1] >= -margin) & (screen[..., 1] <= car_racing.WINDOW_H + margin))
        visible = np.flatnonzero(inside.any(axis=1))
        return list(zip(visible.tolist(), screen[visible].tolist(), strict=True))

    def _fill(self, quad: list[list[float]], color: Sequence[float]) -> None:
        gfxdraw.aapolygon(self.surf, quad, color)
        gfxdraw.filled_polygon(self.surf, quad, color)
