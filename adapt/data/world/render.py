"""Draw one scene in one domain: numpy compositing of a cached anti-aliased mask."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from adapt.data.world import shapes, vocab
from adapt.data.world.domains import Domain, get_domain
from adapt.data.world.scenes import Scene

OFF_ALPHA = 0.15  # opacity of the "off" cells of a patterned fill
COLOUR_JITTER = 10.0  # per-image RGB jitter of object and background colours


def fill_pattern(fill: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Opacity pattern (size, size) in [OFF_ALPHA, 1] for a fill, with a random phase."""
    if fill in ("solid", "hollow"):
        return np.ones((size, size), np.float32)
    px, py = rng.integers(0, 4, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    if fill == "striped":
        on = ((yy + py) // 2) % 2 == 0
    elif fill == "dotted":
        on = ((xx + px) % 4 < 2) & ((yy + py) % 4 < 2)
    elif fill == "checkered":
        on = (((xx + px) // 2) + ((yy + py) // 2)) % 2 == 0
    else:
        raise KeyError(f"unknown fill {fill!r}")
    return np.where(on, 1.0, OFF_ALPHA).astype(np.float32)


def _smooth_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency random texture in about [-1, 1], shape (size, size, 3)."""
    coarse = rng.standard_normal((5, 5, 3)).astype(np.float32)
    idx = np.linspace(0, 4, size)
    i0 = np.floor(idx).astype(int).clip(0, 3)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t[..., None]) + coarse[i0 + 1] * t[..., None]  # (size, 5, 3)
    cols = rows[:, i0] * (1 - t.T[..., None]) + rows[:, i0 + 1] * t.T[..., None]
    return cols / 1.5


def _blur3(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    k = (1.0, 2.0, 1.0)
    h = k[0] * p[:, :-2] + k[1] * p[:, 1:-1] + k[2] * p[:, 2:]
    v = k[0] * h[:-2] + k[1] * h[1:-1] + k[2] * h[2:]
    return v / 16.0


def _composite(canvas: np.ndarray, alpha: np.ndarray, rgb: np.ndarray, x: int, y: int) -> None:
    h, w = alpha.shape
    region = canvas[y:y + h, x:x + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * rgb


def render(scene: Scene, domain: Domain | str, rng: np.random.Generator,
           image_size: int = 32) -> np.ndarray:
    """The scene drawn in ``domain`` as a uint8 array (image_size, image_size, 3).

    ``rng`` supplies the per-image randomness (colour jitter, pattern phase, texture, clutter,
    noise); the same scene, domain and generator state always give the same pixels.
    """
    return render_objects([scene], domain, rng, image_size)[0]


def render_objects(scenes: Sequence[Scene], domain: Domain | str, rng: np.random.Generator,
                   image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Several objects in one image, drawn in order (a later one occludes an earlier one), on the
    first scene's background: (uint8 image, int8 [image_size, image_size] label map with the
    index in ``scenes`` of the object seen at each pixel, -1 for background). A pixel belongs to
    an object where that object's opacity is at least one half and no later object covers it.
    With one scene the generator is read exactly as for ``render``, so the pixels are the same."""
    if isinstance(domain, str):
        domain = get_domain(domain)
    n = image_size
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(2, 3)).astype(np.float32)
    if len(scenes) > 1:  # after the first object's: a single-object image reads nothing more
        extra = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(len(scenes) - 1, 3)).astype(np.float32)
        jitter = np.concatenate([jitter, extra])
    bg = np.asarray(vocab.BACKGROUNDS[scenes[0].bg], np.float32) + jitter[0]
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = bg
    if domain.textured_bg:
        canvas += domain.textured_bg * _smooth_texture(n, rng)
    lo, hi = domain.clutter
    if hi:
        for _ in range(int(rng.integers(lo, hi + 1))):
            side = int(rng.integers(3, 7))
            kind = vocab.SHAPES[int(rng.integers(len(vocab.SHAPES)))]
            x, y = rng.integers(0, n - side + 1, size=2)
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            _composite(canvas, shapes.mask(kind, side, 0), colour, int(x), int(y))
    labels = np.full((n, n), -1, np.int8)
    for i, scene in enumerate(scenes):
        fg = np.asarray(vocab.COLOURS[scene.colour], np.float32) + jitter[1 + i]
        hollow = domain.outline_only or scene.fill == "hollow"
        shape = shapes.mask(scene.shape, scene.side, scene.angle, hollow)
        alpha = shape if hollow else shape * fill_pattern(scene.fill, scene.side, rng)
        _composite(canvas, alpha, fg, scene.x, scene.y)
        h, w = shape.shape
        region = labels[scene.y:scene.y + h, scene.x:scene.x + w]
        region[shape >= 0.5] = i  # the object's extent, whatever its fill pattern
    if domain.blur:
        canvas = (1 - domain.blur) * canvas + domain.blur * _blur3(canvas)
    if domain.gains is not None:
        canvas = canvas * np.asarray(domain.gains, np.float32) + np.asarray(domain.offset, np.float32)
    if domain.contrast != 1.0:
        mean = canvas.mean(axis=(0, 1), keepdims=True)
        canvas = mean + domain.contrast * (canvas - mean)
    if domain.noise:
        canvas += rng.normal(0.0, domain.noise, size=canvas.shape).astype(np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), labels
