"""Test-time views and confidence selection shared by TPT, Zero and DMN.

A test image's views are the image itself, then random resized crops with flips (AugMix on each
crop for the fine-grained sets), made from the normalized test tensor with one batched
``grid_sample``. The crop boxes come from a generator seeded by (seed, the image's bytes): a
view depends only on the image and the seed, never on batch size, order or device count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from adapt.methods.augmix import augmix_normalized
from adapt.methods.base import check_crop_scale


@dataclass
class ViewConfig:
    """The view fields of a test-time method's Config (TPT's defaults; DMN uses 32 views)."""
    # views per image, the original included (TPT's and Zero's batch size 64)
    n_views: int = 64
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # AugMix on every crop (severity 1, 3 chains of 1-3 ops), as the originals do for the
    # fine-grained datasets; off for the ImageNet sets
    augmix: bool = False
    augmix_severity: float = 1.0
    # seed of the views; null = the recipe seed (filled in at setup)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")
        if self.augmix_severity <= 0.1:
            raise ValueError(f"augmix_severity must be > 0.1 (levels are drawn in [0.1, severity]), got {self.augmix_severity}")
        check_crop_scale(self.crop_scale)


def with_view_seed(config, datamodule):
    """``config`` with ``seed`` filled from the recipe's when null (the resolved config then
    records it, so an export reproduces the views)."""
    if config.seed is None:
        return dataclasses.replace(config, seed=int(datamodule.seed))
    return config


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def averaged_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the rows' softmax (computed in log space)."""
    logp = logits.float().log_softmax(-1)
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
    return -(mean_logp.exp() * mean_logp).sum()


def confident(logits: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the ``int(n · share)`` most confident rows (lowest entropy, ascending, as the
    originals' argsort), at least one: the originals keep none when n · share < 1."""
    k = max(1, int(logits.shape[0] * share))
    return torch.argsort(entropy(logits.float()))[:k]


def crop_boxes(height: int, width: int, n: int, generator: torch.Generator, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """[n, 5] float64 rows (top, left, h, w, flip) drawn like torchvision's RandomResizedCrop
    (area ``scale``, log-uniform aspect ``ratio``, ``attempts`` tries, then the centred whole
    image clipped to the ratio range) and RandomHorizontalFlip (p=0.5)."""
    area = height * width
    u = torch.rand(n, attempts, 2, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1])
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(1)
    first = ok.float().argmax(1)  # the first attempt that fits
    rows = torch.arange(n)
    in_ratio = width / height
    fw, fh = ((width, round(width / ratio[0])) if in_ratio < ratio[0] else
              (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    bw = torch.where(found, w[rows, first], float(fw))
    bh = torch.where(found, h[rows, first], float(fh))
    v = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(v[:, 0] * (height - bh + 1)), ((height - bh) / 2).round())
    left = torch.where(found, torch.floor(v[:, 1] * (width - bw + 1)), ((width - bw) / 2).round())
    return torch.stack([top, left, bh, bw, (v[:, 2] < 0.5).double()], dim=1)


def resized_crops(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each box of ``image`` [C, H, W] (rows of ``crop_boxes``), flipped where asked and resized
    to H×W bilinearly: one batched ``grid_sample``, no per-view loop."""
    channels, height, width = image.shape
    top, left, h, w, flip = boxes.double().unbind(1)
    # affine map from output coordinates in [-1, 1] to the box in the input (align_corners=False)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip > 0, -1.0, 1.0) * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(image.device, torch.float32)
    grid = F.affine_grid(theta, [len(boxes), channels, height, width], align_corners=False)
    # clamp to the box's edge pixel centres, so that nothing outside the box is read (as
    # cropping, then resizing does)
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], 1)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], 1)
    lo, hi = (t.to(grid.device, grid.dtype)[:, None, None, :] for t in (lo, hi))
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    src = image.float().unsqueeze(0).expand(len(boxes), -1, -1, -1)
    out = F.grid_sample(src, grid, mode="bilinear", align_corners=False)
    return out.to(image.dtype)


def test_views(image: torch.Tensor, cfg, mean, std) -> torch.Tensor:
    """[cfg.n_views, C, H, W]: ``image`` [C, H, W] itself first, then its seeded crops (and
    AugMix when ``cfg.augmix``); ``cfg`` has the fields of ``ViewConfig``."""
    if cfg.n_views == 1:
        return image.unsqueeze(0)
    digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8,
                             key=str(cfg.seed or 0).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
    boxes = crop_boxes(image.shape[-2], image.shape[-1], cfg.n_views - 1, gen, tuple(cfg.crop_scale))
    crops = resized_crops(image, boxes)
    if cfg.augmix:
        crops = augmix_normalized(crops, mean, std, gen, cfg.augmix_severity)
    return torch.cat([image.unsqueeze(0), crops])


test_views.__test__ = False  # not a pytest test, despite its name
