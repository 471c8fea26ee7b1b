"""AugMix (Hendrycks et al., ICLR 2020) as TPT uses it, on image tensors with a seeded generator.

TPT's views for the fine-grained datasets: each random crop ``x`` becomes
``m·x + (1 − m)·Σᵢ wᵢ·chainᵢ(x)``, three chains of 1–3 operations drawn from AugMix's list
without the colour/contrast/brightness/sharpness ops (which overlap ImageNet-C), severity 1,
``w ~ Dirichlet(1, 1, 1)``, ``m ~ Beta(1, 1)``. The operations follow PIL's definitions (the
original runs them on PIL images); here they act on [0, 1] tensors [C, H, W] so views stay one
batch on the device, and every draw comes from a ``torch.Generator`` so a view depends only on
its seed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

# magnitudes at level 10 (AugMix's augmentations.py); ``level`` is drawn in [0.1, severity]
ROTATE_DEG, SOLARIZE_MAX, POSTERIZE_MAX, SHEAR_MAX = 30, 256, 4, 0.3
TRANSLATE_FRACTION = 1 / 3  # of the image size


def _level(gen: torch.Generator, severity: float) -> float:
    return 0.1 + (severity - 0.1) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _sign(gen: torch.Generator) -> float:
    return -1.0 if float(torch.rand((), generator=gen)) < 0.5 else 1.0


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def pil_affine(x: torch.Tensor, coeffs: tuple[float, float, float, float, float, float]) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, (a, b, c, d, e, f), BILINEAR)``: output pixel (u, v)
    reads input (a·u + b·v + c, d·u + e·v + f), zero outside (pixel centres at +0.5)."""
    _, h, w = x.shape
    a, b, c, d, e, f = coeffs
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                          torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    src_u = a * u + b * v + c
    src_v = d * u + e * v + f
    grid = torch.stack([2 * src_u / w - 1, 2 * src_v / h - 1], dim=-1).to(x.device, torch.float32)
    out = F.grid_sample(x.float().unsqueeze(0), grid.unsqueeze(0), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out[0].to(x.dtype)


def autocontrast(x, gen, severity):
    return TF.autocontrast(_as_uint8(x)).float() / 255


def equalize(x, gen, severity):
    return TF.equalize(_as_uint8(x)).float() / 255


def posterize(x, gen, severity):
    bits = 4 - int(_level(gen, severity) * POSTERIZE_MAX / 10)
    return TF.posterize(_as_uint8(x), bits).float() / 255


def rotate(x, gen, severity):
    degrees = int(_level(gen, severity) * ROTATE_DEG / 10) * _sign(gen)
    return TF.rotate(x, degrees, interpolation=InterpolationMode.BILINEAR)


def solarize(x, gen, severity):
    threshold = SOLARIZE_MAX - int(_level(gen, severity) * SOLARIZE_MAX / 10)
    return TF.solarize(_as_uint8(x), threshold).float() / 255


def shear_x(x, gen, severity):
    s = _level(gen, severity) * SHEAR_MAX / 10 * _sign(gen)
    return pil_affine(x, (1, s, 0, 0, 1, 0))


def shear_y(x, gen, severity):
    s = _level(gen, severity) * SHEAR_MAX / 10 * _sign(gen)
    return pil_affine(x, (1, 0, 0, s, 1, 0))


def translate_x(x, gen, severity):
    t = int(_level(gen, severity) * x.shape[-1] * TRANSLATE_FRACTION / 10) * _sign(gen)
    return pil_affine(x, (1, 0, t, 0, 1, 0))


def translate_y(x, gen, severity):
    t = int(_level(gen, severity) * x.shape[-2] * TRANSLATE_FRACTION / 10) * _sign(gen)
    return pil_affine(x, (1, 0, 0, 0, 1, t))


OPERATIONS: list[Callable] = [autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y,
                              translate_x, translate_y]


def augmix(x: torch.Tensor, gen: torch.Generator, severity: float = 1.0, width: int = 3,
           max_depth: int = 3) -> torch.Tensor:
    """One AugMix view of ``x`` ([C, H, W] in [0, 1])."""
    # Dirichlet(1, ..., 1) = normalised Exp(1) draws; Beta(1, 1) = uniform
    e = -torch.log(torch.rand(width, generator=gen, dtype=torch.float64).clamp_min(1e-12))
    weights = (e / e.sum()).tolist()
    m = float(torch.rand((), generator=gen, dtype=torch.float64))
    mix = torch.zeros_like(x, dtype=torch.float32)
    for w in weights:
        chain = x
        depth = int(torch.randint(1, max_depth + 1, (), generator=gen))
        for _ in range(depth):
            op = OPERATIONS[int(torch.randint(len(OPERATIONS), (), generator=gen))]
            chain = op(chain, gen, severity)
        mix += w * chain.float()
    return (m * x.float() + (1 - m) * mix).to(x.dtype)


def augmix_normalized(views: torch.Tensor, mean, std, gen: torch.Generator,
                      severity: float = 1.0) -> torch.Tensor:
    """AugMix of each normalized view [N, C, H, W]: undo the normalisation, mix, redo it (the
    original mixes preprocessed tensors, which is the same up to the affine normalisation)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=views.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=views.device)[:, None, None]
    out = []
    for view in views:
        raw = (view.float() * std_t + mean_t).clamp(0, 1)
        out.append((augmix(raw, gen, severity) - mean_t) / std_t)
    return torch.stack(out).to(views.dtype)

