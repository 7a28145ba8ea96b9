"""Procedural data for tiny-shapes: one flat-coloured shape on a flat-coloured background, with a caption.

Everything is drawn with numpy from a seeded generator, so a dataset is fully described by its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]

TEMPLATES = [
    "a {fg} {shape} on a {bg} background",
    "a {fg} {shape} on {bg}",
    "{fg} {shape}, {bg} background",
    "a {size} {fg} {shape} on a {bg} background",
]


@dataclass(frozen=True)
class Scene:
    fg: str
    bg: str
    shape: str
    cx: float
    cy: float
    r: float  # half the shape's extent, in pixels

    def caption(self, template: int = 0) -> str:
        size = "small" if self.r < 12 else "large"
        return TEMPLATES[template].format(fg=self.fg, bg=self.bg, shape=self.shape, size=size)


def random_scene(rng: np.random.Generator) -> Scene:
    fg, bg = rng.choice(len(COLOURS), size=2, replace=False)
    r = float(rng.uniform(8, 20))
    cx = float(rng.uniform(r + 2, SIZE - r - 2))
    cy = float(rng.uniform(r + 2, SIZE - r - 2))
    return Scene(COLOURS[fg], COLOURS[bg], SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, r)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        side = r * 0.9  # equal area feel next to the circle
        return (np.abs(x - cx) <= side) & (np.abs(y - cy) <= side)
    if shape == "triangle":  # upright isosceles: apex at top, base at bottom
        top, bottom = cy - r, cy + r
        t = np.clip((y - top) / (bottom - top), 0, 1)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= t * r)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """uint8 array (SIZE, SIZE, 3)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.bg]
    img[shape_mask(scene.shape, scene.cx, scene.cy, scene.r)] = PALETTE[scene.fg]
    return img


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    scenes = [random_scene(rng) for _ in range(n)]
    captions = [s.caption(int(rng.integers(len(TEMPLATES)))) for s in scenes]
    return np.stack([render(s) for s in scenes]), captions, scenes
