"""Smooth random shapes on a pixel grid, in normalised coordinates (0..1 across the image)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates (x, y), each (size, size); cached because every shape needs them."""
    coords = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@dataclass(frozen=True)
class Blob:
    """An ellipse with a smoothly wobbling rim: centre, radii and angle in normalised units."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    wobble: tuple[tuple[float, float], ...] = ()

    def mask(self, size: int) -> np.ndarray:
        """Boolean (size, size) mask of the blob."""
        out = np.zeros((size, size), bool)
        reach = max(self.rx, self.ry) * (1.0 + sum(abs(amplitude) for amplitude, _ in self.wobble))
        # Only the bounding box can be inside; evaluating just that box is most of the generator's speed.
        cols = _pixel_span(self.cx, reach, size)
        rows = _pixel_span(self.cy, reach, size)
        if cols.start >= cols.stop or rows.start >= rows.stop:
            return out
        x, y = grid(size)
        u, v = self._frame(x[rows, cols], y[rows, cols])
        radius = np.hypot(u, v)
        theta = np.arctan2(v, u)
        rim = np.ones_like(theta)
        for harmonic, (amplitude, phase) in enumerate(self.wobble, start=2):
            rim += amplitude * np.cos(harmonic * theta + phase)
        out[rows, cols] = radius <= rim
        return out

    def _frame(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        return (dx * cos + dy * sin) / self.rx, (-dx * sin + dy * cos) / self.ry


def _pixel_span(centre: float, reach: float, size: int) -> slice:
    return slice(
        max(0, int(np.floor((centre - reach) * size)) - 1),
        min(size, int(np.ceil((centre + reach) * size)) + 1),
    )


def random_blob(
    rng: np.random.Generator,
    centre: tuple[float, float],
    radii: tuple[float, float],
    jitter: float = 0.02,
    scale: tuple[float, float] = (0.9, 1.1),
    angle: float = 0.0,
    angle_jitter: float = 0.2,
    wobble: float = 0.06,
) -> Blob:
    """A blob near ``centre`` with radii scaled by a random factor and a gently wobbling rim."""
    factor = rng.uniform(*scale)
    return Blob(
        cx=centre[0] + rng.uniform(-jitter, jitter),
        cy=centre[1] + rng.uniform(-jitter, jitter),
        rx=radii[0] * factor * rng.uniform(0.93, 1.07),
        ry=radii[1] * factor * rng.uniform(0.93, 1.07),
        angle=angle + rng.uniform(-angle_jitter, angle_jitter),
        wobble=tuple((rng.uniform(0, wobble), rng.uniform(0, 2 * np.pi)) for _ in range(3)),
    )


def split_by_line(
    mask: np.ndarray, point: tuple[float, float], slope: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``mask`` along the line through ``point`` (normalised) with ``slope``: (upper part, lower part)."""
    x, y = grid(mask.shape[0])
    above = y < point[1] + slope * (x - point[0])
    return mask & above, mask & ~above
