"""Rendering domains: how a scene is photographed. ``clean`` is the pretraining domain; the others
are downstream domains that differ visibly from it, so zero-shot transfer is imperfect."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    textured_bg: float = 0.0  # amplitude (0..255) of a smooth random background texture
    clutter: tuple[int, int] = (0, 0)  # min, max number of small distractor marks
    outline_only: bool = False  # draw every shape hollow, whatever its fill
    blur: float = 0.0  # 0..1: blend towards a 3x3 blurred copy
    gains: Optional[tuple[float, float, float]] = None  # per-channel colour cast (white balance)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    contrast: float = 1.0  # scale around the image mean
    noise: float = 0.0  # std of additive Gaussian pixel noise (0..255 scale)


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("clean", "flat background, crisp anti-aliased shape (the pretraining domain)"),
    Domain("dusk", "warm evening light: a strong orange colour cast, lower contrast, sensor noise",
           gains=(1.0, 0.85, 0.65), offset=(25.0, 10.0, 0.0), contrast=0.8, noise=10.0),
    Domain("noisy", "a cheap camera: blur and heavy pixel noise", blur=0.8, noise=28.0),
    Domain("clutter", "textured background with small distractor marks of any colour",
           textured_bg=40.0, clutter=(3, 6), noise=6.0),
    Domain("sketch", "outline-only shapes on a textured background",
           outline_only=True, textured_bg=25.0, noise=6.0),
)}


def get_domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise KeyError(f"unknown world domain {name!r}; known: {sorted(DOMAINS)}") from None
