"""TPT (Shu et al., NeurIPS 2022): test-time prompt tuning, one image at a time, no labels.

Per test image: 64 views (the image itself + 63 random resized crops with flips), logits of every
view under a CoOp context initialised from "a photo of a", keep the 10% most confident views
(lowest entropy), take one AdamW step on the entropy of their averaged prediction, then predict
the original view. The context and the optimizer start afresh for every image.

Views are made from the normalized test tensor itself (one batched ``grid_sample``), with crop
boxes drawn from a generator seeded by (seed, the image's bytes): a prediction depends only on the
image and the seed, never on batch size, order or device count. TPT's code crops the raw image
(RandomResizedCrop(224), bilinear, default scale (0.08, 1)) for the ImageNet sets and adds AugMix
for the fine-grained ones (``augmix: true``, recipes/tpt/crossdataset.yaml; ``adapt.methods.augmix``).
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
from adapt.methods.base import Method, check_crop_scale, is_features
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method


@dataclass
class TPTConfig:
    ctx_init: str = "a photo of a"
    # views per image, the original included (TPT's batch size 64)
    n_views: int = 64
    # fraction of views kept by confidence (lowest entropy); int(n_views · p), at least 1
    selection_p: float = 0.1
    # test-time steps; the selection is made on the first and kept (as TPT)
    steps: int = 1
    # AdamW as TPT builds it: torch defaults but lr (weight decay 0.01, betas 0.9/0.999)
    lr: float = 5e-3
    weight_decay: float = 0.01
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # AugMix on every crop (severity 1, 3 chains of 1-3 ops), as TPT does for the fine-grained
    # datasets; off for the ImageNet sets (TPT's default setting here)
    augmix: bool = False
    augmix_severity: float = 1.0
    # seed of the views; null = the recipe seed (filled in at setup)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.ctx_init.strip():
            raise ValueError("ctx_init must be a prompt such as 'a photo of a' (its words set the context)")
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")
        if not 0 < self.selection_p <= 1:
            raise ValueError(f"selection_p must be in (0, 1], got {self.selection_p}")
        if self.steps < 0 or self.lr < 0 or self.weight_decay < 0:
            raise ValueError("steps, lr and weight_decay must be >= 0")
        if self.augmix_severity <= 0.1:
            raise ValueError(f"augmix_severity must be > 0.1 (levels are drawn in [0.1, severity]), got {self.augmix_severity}")
        check_crop_scale(self.crop_scale)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def averaged_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the rows' softmax (computed in log space)."""
    logp = logits.float().log_softmax(-1)
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
    return -(mean_logp.exp() * mean_logp).sum()


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


@register_method("tpt")
class TPT(Method):
    Config = TPTConfig
    trainable_kind = "text context, per test image"
    grad_at_test = True  # the engine evaluates with inference mode off

    def __init__(self, config: TPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.prompts = ContextPrompts(backbone, 0, config.ctx_init, position="end")
        # the initial context is a constant: nothing trains before test (is_trainable is False);
        # each image tunes its own copy
        self.prompts.ctx.requires_grad_(False)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.prompts.build(self.classnames)

    def setup(self, datamodule) -> None:
        if self.config.seed is None:  # the resolved config records it, so an export reproduces
            self.config = dataclasses.replace(self.config, seed=int(datamodule.seed))

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """The untuned model (context = its initialisation)."""
        return self.backbone.logits(image_features, self.cached_text_features(self.prompts.text_features))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if is_features(x):
            raise ValueError("tpt augments each test image, so it needs images, not cached features")
        return torch.cat([self.predict_one(image) for image in x])

    def views(self, image: torch.Tensor) -> torch.Tensor:
        """[n_views, C, H, W]: the image itself first, then the random crops."""
        cfg = self.config
        digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8,
                                 key=str(cfg.seed or 0).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
        boxes = crop_boxes(image.shape[-2], image.shape[-1], cfg.n_views - 1, gen, tuple(cfg.crop_scale))
        crops = resized_crops(image, boxes)
        if cfg.augmix:
            crops = augmix_normalized(crops, self.backbone.image_mean, self.backbone.image_std, gen,
                                      cfg.augmix_severity)
        return torch.cat([image.unsqueeze(0), crops])

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices of the most confident views (lowest entropy; TPT's argsort order)."""
        k = max(1, int(logits.shape[0] * self.config.selection_p))
        return torch.argsort(entropy(logits.float()))[:k]

    def tune(self, feats: torch.Tensor) -> torch.Tensor:
        """A fresh context (the initialisation) and optimizer, tuned on one image's view features
        [n_views, d]; returns the tuned context."""
        cfg = self.config
        ctx = self.prompts.ctx.detach().clone().float()
        if cfg.steps == 0:
            return ctx
        ctx.requires_grad_(True)
        opt = torch.optim.AdamW([ctx], lr=cfg.lr, weight_decay=cfg.weight_decay)
        chosen = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                logits = self.backbone.logits(feats, self.prompts.text_features(ctx))
                if chosen is None:
                    chosen = self.select(logits.detach())
                loss = averaged_entropy(logits[chosen])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return ctx.detach()

    def predict_one(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [1, C] of one image [C, H, W] after tuning on its views."""
        with torch.no_grad():
            feats = self.backbone.encode_image(self.views(image))
        ctx = self.tune(feats)
        with torch.no_grad():
            return self.backbone.logits(feats[:1], self.prompts.text_features(ctx))
