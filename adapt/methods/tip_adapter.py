"""Tip-Adapter (Zhang et al., ECCV 2022): a training-free cache model on top of zero-shot CLIP.

Keys are the few-shot training images' features (mean of ``augment_epochs`` augmented passes,
renormalized), values their one-hot labels. For a normalized image feature f:

    logits = s·f·Wᵀ + α·exp(−β(1 − f·Kᵀ))·V

with W the zero-shot classifier and s = 100, the constant the original code multiplies by
(main.py: ``100. * test_features @ clip_weights``) whatever the backbone; it equals exp(logit
scale) only for models whose scale saturated at 100 (OpenAI CLIP). ``clip_logit_scale: null``
uses the backbone's own scale (and logit bias) instead. α and β are
searched on the validation split (never on test); without one they keep the config's values.
Tip-Adapter-F (``finetune: true``) makes the keys trainable; α/β are searched after training.
The cache is the adapter: keys, labels, α and β are saved, so an export reproduces the logits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.data.items import Item
from adapt.data.transforms import train_transform
from adapt.methods.base import HandWrittenClassifier, check_crop_scale, items_of_classes, items_of_every_class
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@dataclass
class TipAdapterConfig:
    # residual ratio α and sharpness β; the starting point (and the values used without val data)
    alpha: float = 1.0
    beta: float = 1.0
    # augmented passes over the training images averaged into the keys; 0 = one pass with the
    # test transform (no augmentation)
    augment_epochs: int = 10
    # random resized crop area range of those passes (+ horizontal flip), as the original
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # Tip-Adapter-F: the cache keys are trained (AdamW lr 1e-3, eps 1e-4 in its recipe)
    finetune: bool = False
    # grid search of α/β on the validation split, as the original: β_i = 0.1 + i(β_max − 0.1)/n_β,
    # i < n_β (outer loop), the same for α (inner), first best wins. Maxima differ per dataset in
    # the original configs (ImageNet / Pets 7 / 3, DTD 13 / 13, EuroSAT 12 / 10, Aircraft 30 / 30)
    search: bool = True
    beta_max: float = 7.0
    alpha_max: float = 3.0
    beta_steps: int = 200
    alpha_steps: int = 20
    # zero-shot classifier from all of the dataset's templates (ImageNet: its 7-template ensemble,
    # as the original; other datasets ship one) or only the first
    ensemble: bool = True
    # multiplier of the zero-shot logits: the original's hard-coded 100; null = the backbone's own
    # exp(logit_scale) (and logit bias)
    clip_logit_scale: Optional[float] = 100.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.augment_epochs < 0:
            raise ValueError(f"augment_epochs must be >= 0 (0 = no augmentation), got {self.augment_epochs}")
        check_crop_scale(self.crop_scale)
        if self.clip_logit_scale is not None and self.clip_logit_scale <= 0:
            raise ValueError(f"clip_logit_scale must be > 0 (or null for the model's), got {self.clip_logit_scale}")
        if self.beta_steps < 1 or self.alpha_steps < 1:
            raise ValueError("beta_steps and alpha_steps must be >= 1")
        if self.beta_max <= 0.1 or self.alpha_max <= 0.1:
            raise ValueError("beta_max and alpha_max must be > 0.1 (the grids start at 0.1)")


def search_grid(maximum: float, steps: int, start: float = 0.1) -> list[float]:
    return [start + i * (maximum - start) / steps for i in range(steps)]


@register_method("tipadapter")
class TipAdapter(HandWrittenClassifier):
    Config = TipAdapterConfig
    trainable_kind = "none (cache); -F: cache keys"
    supports_feature_cache = True
    repointable = False  # the values are one-hot over the classes the cache was built for

    def __init__(self, config: TipAdapterConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        device, dtype = backbone.logit_scale.device, backbone.dtype
        keys = torch.zeros(0, backbone.embed_dim, dtype=dtype, device=device)
        if config.finetune:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_labels", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("alpha", torch.tensor(float(config.alpha), device=device))
        self.register_buffer("beta", torch.tensor(float(config.beta), device=device))
        self.search_result: Optional[dict] = None  # what the α/β search chose, and on what
        self._val: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.rebuild_classes()

    # ------------------------------------------------------------------ classes ----------------
    def rebuild_classes(self) -> None:
        super().rebuild_classes()
        self._rebuild_values()

    def _rebuild_values(self) -> None:
        values = F.one_hot(self.cache_labels, len(self.classnames)).to(self.backbone.dtype)
        self.register_buffer("cache_values", values, persistent=False)

    def _set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        # assign .data: a trainable key Parameter keeps its identity (optimizers hold it)
        self.cache_keys.data = keys.to(self.cache_keys.device, self.cache_keys.dtype)
        self.cache_labels.data = labels.to(self.cache_labels.device, torch.long)
        self._rebuild_values()

    # ------------------------------------------------------------------ cache ------------------
    def setup(self, datamodule) -> None:
        """Build the cache from the training images of this method's classes and search α/β on
        the validation images (if any). Runs on the backbone's device."""
        cfg, dm = self.config, datamodule
        items = self._own_items(dm.train_items, dm.train_classnames, "training", required=True)
        self._set_cache(*self.encode_keys(dm, items, cfg.augment_epochs))
        with torch.no_grad():
            self.alpha.fill_(cfg.alpha)
            self.beta.fill_(cfg.beta)
        self.search_result, self._val = None, None
        val = self._own_items(dm.val_items, dm.train_classnames, "validation", required=False)
        if cfg.search and val:
            cached = dm.encode(self.backbone, val, dm.test_transform(), "val")
            self._val = (cached.features[0], cached.labels)
            if not cfg.finetune:  # Tip-Adapter-F trains with the config's α/β, searches after
                self.search_hparams()
        elif cfg.search:
            log.info("tipadapter: no validation images; keeping alpha=%g, beta=%g", cfg.alpha, cfg.beta)

    def encode_keys(self, dm, items: Sequence[Item], augment_epochs: int, root=None,
                    split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized cache keys [n, d] and labels [n] of ``items``: the mean of
        ``augment_epochs`` augmented passes (random resized crop over ``crop_scale`` + flip), or
        one pass of the test transform when 0."""
        if augment_epochs > 0:
            transform = train_transform(dm.image_size, dm.mean, dm.std, scale=self.config.crop_scale)
        else:
            transform = dm.test_transform()
        # the original averages the unnormalized features of its augmented passes, then
        # normalizes the mean; the passes come from (and go to) the feature cache
        views = dm.encode(self.backbone, items, transform, split, views=max(1, augment_epochs),
                          normalize=False, root=root)
        return F.normalize(views.features.mean(0), dim=-1), views.labels

    def _own_items(self, items: Sequence[Item], names: Sequence[str], split: str,
                   required: bool) -> list[Item]:
        """The items of this method's classes, relabelled to its class order (by name)."""
        if required:
            return items_of_every_class(items, names, self.classnames,
                                        f"tipadapter needs {split} images of every class to build its cache")
        return items_of_classes(items, names, self.classnames)

    # ------------------------------------------------------------------ α / β ------------------
    def search_hparams(self) -> Optional[dict]:
        """Grid-search α/β on the stored validation features; sets and returns the choice."""
        if self._val is None:
            return None
        cfg = self.config
        device = self.cache_keys.device
        f, y = (t.to(device) for t in self._val)
        with torch.no_grad():
            zs = self.zero_shot_logits(f).float()
            before = int((self._combine(zs, f, self.alpha, self.beta).argmax(-1) == y).sum())
            alphas = torch.tensor(search_grid(cfg.alpha_max, cfg.alpha_steps), device=device)
            chunk = max(1, 2 ** 24 // max(1, zs.numel()))  # bounds the [alphas, N, C] block
            best = (-1, float(self.alpha), float(self.beta))
            for beta in search_grid(cfg.beta_max, cfg.beta_steps):
                cache = self._cache_logits(f, beta).float()
                correct = torch.cat([
                    ((zs + a[:, None, None] * cache).argmax(-1) == y).sum(-1)
                    for a in alphas.split(chunk)])
                i = int((correct == correct.max()).nonzero()[0])  # the first best alpha
                if int(correct[i]) > best[0]:
                    best = (int(correct[i]), float(alphas[i]), beta)
            self.alpha.fill_(best[1])
            self.beta.fill_(best[2])
        n = len(y)
        self.search_result = {"alpha": best[1], "beta": best[2], "val_acc": 100.0 * best[0] / n,
                              "val_acc_before": 100.0 * before / n, "val_images": n}
        log.info("tipadapter: alpha=%.4g beta=%.4g chosen on %d validation images (acc %.2f%%, "
                 "%.2f%% before)", best[1], best[2], n, 100.0 * best[0] / n, 100.0 * before / n)
        return self.search_result

    def on_fit_end(self) -> None:
        if self.config.finetune:
            self.search_hparams()

    def scalars(self) -> dict[str, float]:
        out = {"alpha": float(self.alpha), "beta": float(self.beta)}
        if self.search_result is not None:
            out.update(val_acc=self.search_result["val_acc"], val_acc_before=self.search_result["val_acc_before"])
        return out

    # ------------------------------------------------------------------ logits -----------------
    def zero_shot_logits(self, f: torch.Tensor) -> torch.Tensor:
        scale = self.config.clip_logit_scale
        if scale is None:
            return self.backbone.logits(f, self.text_features)
        return scale * f @ self.text_features.to(f.dtype).t()

    def _cache_logits(self, f: torch.Tensor, beta) -> torch.Tensor:
        affinity = f @ self.cache_keys.to(f.dtype).t()
        return torch.exp(-beta * (1 - affinity)) @ self.cache_values.to(affinity.dtype)

    def _combine(self, zs_logits: torch.Tensor, f: torch.Tensor, alpha, beta) -> torch.Tensor:
        return zs_logits + alpha * self._cache_logits(f, beta)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.cache_keys.shape[0] == 0:
            raise RuntimeError("tipadapter has no cache yet: call setup(datamodule) with the "
                               "few-shot data, or load an exported adapter")
        zs = self.zero_shot_logits(image_features)
        return self._combine(zs, image_features, self.alpha, self.beta)

    # ------------------------------------------------------------------ state ------------------
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resize the cache to the saved one (its size is the number of training images)."""
        if "cache_keys" in state and "cache_labels" in state:
            labels = state["cache_labels"]
            if len(labels) and int(labels.max()) >= len(self.classnames):
                raise ValueError(f"tipadapter: the saved cache has labels up to {int(labels.max())} "
                                 f"but this model has {len(self.classnames)} classes")
            self._set_cache(torch.zeros_like(state["cache_keys"]), labels)
        super().load_trainable_state(state)
