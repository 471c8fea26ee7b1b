"""Anti-aliased shape masks: each shape is drawn once at high resolution with PIL, then rotated,
shrunk to the pixel size a scene asks for and cached (the cache is a pure function of its key)."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

HI = 96  # side of the high-resolution canvas a shape is drawn on
OUTLINE_PX = 1.6  # outline thickness (in output pixels) of hollow shapes


def _pt(u: float, v: float) -> tuple[float, float]:
    """Unit-box coordinates in [-1, 1] to canvas pixels (with a small margin)."""
    half = HI / 2
    return (half + u * half * 0.96, half + v * half * 0.96)


def _regular(n: int, r: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
    return [_pt(r * math.cos(math.radians(start + 360 * k / n)),
                r * math.sin(math.radians(start + 360 * k / n))) for k in range(n)]


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.radians(-90 + 180 * k / points)
        out.append(_pt(r * math.cos(a), r * math.sin(a) + 0.08))
    return out


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(120):
        t = 2 * math.pi * k / 120
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append(_pt(x / 17, -y / 17 - 0.1))
    return pts


def _draw(name: str) -> Image.Image:
    img = Image.new("L", (HI, HI), 0)
    d = ImageDraw.Draw(img)
    if name == "circle":
        d.ellipse([_pt(-1, -1), _pt(1, 1)], fill=255)
    elif name == "square":
        d.rectangle([_pt(-0.85, -0.85), _pt(0.85, 0.85)], fill=255)
    elif name == "triangle":
        d.polygon([_pt(0, -1), _pt(1, 0.8), _pt(-1, 0.8)], fill=255)
    elif name == "star":
        d.polygon(_star(), fill=255)
    elif name == "cross":
        w = 0.34
        d.rectangle([_pt(-w, -1), _pt(w, 1)], fill=255)
        d.rectangle([_pt(-1, -w), _pt(1, w)], fill=255)
    elif name == "heart":
        d.polygon(_heart(), fill=255)
    elif name == "ring":
        d.ellipse([_pt(-1, -1), _pt(1, 1)], fill=255)
        d.ellipse([_pt(-0.52, -0.52), _pt(0.52, 0.52)], fill=0)
    elif name == "crescent":
        d.ellipse([_pt(-1, -1), _pt(1, 1)], fill=255)
        d.ellipse([_pt(-0.45, -1.05), _pt(1.35, 0.75)], fill=0)
    elif name == "diamond":
        d.polygon([_pt(0, -1), _pt(0.62, 0), _pt(0, 1), _pt(-0.62, 0)], fill=255)
    elif name == "hexagon":
        d.polygon(_regular(6, start=0), fill=255)
    elif name == "pentagon":
        d.polygon(_regular(5), fill=255)
    elif name == "arrow":
        d.polygon([_pt(-1, -0.28), _pt(0.15, -0.28), _pt(0.15, -0.75), _pt(1, 0),
                   _pt(0.15, 0.75), _pt(0.15, 0.28), _pt(-1, 0.28)], fill=255)
    else:
        raise KeyError(f"unknown shape {name!r}")
    return img


@lru_cache(maxsize=None)
def _hires(name: str, angle: int) -> Image.Image:
    img = _draw(name)
    if angle:
        img = img.rotate(angle, resample=Image.BILINEAR)
    return img


@lru_cache(maxsize=None)
def mask(name: str, side: int, angle: int = 0, hollow: bool = False) -> np.ndarray:
    """Float mask in [0, 1] of shape (side, side)."""
    img = _hires(name, angle)
    if hollow:
        k = max(3, 2 * int(round(OUTLINE_PX * HI / side / 2)) + 1)
        img = ImageChops.subtract(img, img.filter(ImageFilter.MinFilter(k)))
    small = img.resize((side, side), resample=Image.BOX)
    out = np.asarray(small, dtype=np.float32) / 255.0
    out.setflags(write=False)
    return out
