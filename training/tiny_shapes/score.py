"""A geometric scorer for tiny-shapes images: background colour, dominant foreground colour, shape.

No learned parts, so it cannot share a bias with the model it judges: the background is the colour of
the border pixels, the foreground colour is the median of the pixels far from it, the shape's pixels
are those nearer the foreground colour than the background's (the half-way contour, so a soft edge
counts as it looks), and the shape is read from how much of its bounding box it fills (square ~1.0,
circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import PALETTE

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    fg: str | None
    bg: str
    shape: str | None
    fill: float


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb.astype(np.float32)) ** 2).sum(axis=1)))]


def read(image: np.ndarray) -> Reading:
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(axis=2))
    mask = dist > 60
    if mask.sum() < 12:
        return Reading(None, nearest_colour(bg_rgb), None, 0.0)
    fg_rgb = np.median(img[mask], axis=0)
    mask = ((img - fg_rgb) ** 2).sum(axis=2) < ((img - bg_rgb) ** 2).sum(axis=2)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return Reading(nearest_colour(fg_rgb), nearest_colour(bg_rgb), shape, fill)
