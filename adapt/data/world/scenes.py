"""A scene: which attributes (by name) and where; sampling scenes from a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from adapt.data.world import vocab

IMAGE_SIZE = 32
MAX_ANGLE = 20  # shapes are rotated by a multiple of ANGLE_STEP in [-MAX_ANGLE, MAX_ANGLE]
ANGLE_STEP = 5


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    fill: str
    size: str
    bg: str
    side: int  # shape bounding-box side in pixels
    x: int  # top-left corner of the bounding box
    y: int
    angle: int  # degrees

    def attribute(self, name: str) -> str:
        return getattr(self, name)


def sample_scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE, *,
                 shape: Optional[str] = None, colour: Optional[str] = None,
                 fill: Optional[str] = None, size: Optional[str] = None,
                 bg: Optional[str] = None) -> Scene:
    """One random scene; any attribute given is kept, the rest are drawn uniformly.

    The draw order is fixed (every attribute consumes the generator whether given or not) so a
    scene's geometry does not depend on which attributes were pinned.
    """
    picks = {
        "shape": rng.integers(len(vocab.SHAPES)),
        "colour": rng.integers(len(vocab.COLOUR_NAMES)),
        "fill": rng.integers(len(vocab.FILLS)),
        "size": rng.integers(len(vocab.SIZE_NAMES)),
        "bg": rng.integers(len(vocab.BACKGROUND_NAMES)),
    }
    shape = shape or vocab.SHAPES[picks["shape"]]
    colour = colour or vocab.COLOUR_NAMES[picks["colour"]]
    fill = fill or vocab.FILLS[picks["fill"]]
    size = size or vocab.SIZE_NAMES[picks["size"]]
    bg = bg or vocab.BACKGROUND_NAMES[picks["bg"]]
    lo, hi = vocab.SIZES[size]
    scale = image_size / IMAGE_SIZE
    side = int(round(rng.integers(lo, hi + 1) * scale))
    x = int(rng.integers(0, image_size - side + 1))
    y = int(rng.integers(0, image_size - side + 1))
    angle = int(rng.integers(-MAX_ANGLE // ANGLE_STEP, MAX_ANGLE // ANGLE_STEP + 1)) * ANGLE_STEP
    return Scene(shape, colour, fill, size, bg, side, x, y, angle)
