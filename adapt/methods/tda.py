"""TDA, training-free dynamic adapter (Karmanov et al., CVPR 2024): two caches over the test stream.

One view per image. Each test image's zero-shot prediction ŷ and entropy H (nats) decide what
is remembered (kdiAAA/TDA, tda_runner.py):
- positive cache: per predicted class, the ``pos_shot_capacity`` = 3 lowest-entropy image
  features seen so far (a new one replaces the class's highest-entropy entry when it is lower);
- negative cache: images of medium confidence, 0.2 < H / log2(C) < 0.5 (the original divides
  the entropy in nats by log2 C), keep ``neg_shot_capacity`` = 2 per class, with their
  probability vectors.
The caches are updated with the current image first, then it is classified:
``logits = zs + α₊·exp(−β₊(1 − f·K₊ᵀ))·L₊ − α₋·exp(−β₋(1 − f·K₋ᵀ))·M₋`` where L₊ are one-hot
labels of the positive entries and M₋ marks the classes whose stored probability lies in
(0.03, 1.0). α₊ = 2, β₊ = 5 (configs/imagenet.yaml; the fine-grained sets have their own,
e.g. dtd 2 / 3, eurosat 4 / 8), α₋ = 0.117, β₋ = 1. The state is carried along the test stream
(online); the engine resets it for every evaluation set and feeds a seeded order.

Departures: one view for every dataset (the original averages the most confident 10% of 64
AugMix views for ImageNet-A/V/R/S); the classifier is the mean of the dataset's templates
(``ensemble``), as the original's per-dataset template lists; fp32 cache logits (the original
casts them to fp16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from adapt.methods.base import HandWrittenClassifier, check_templates
from adapt.methods.registry import register_method
from adapt.methods.views import entropy


@dataclass
class TDAConfig:
    pos_shot_capacity: int = 3
    pos_alpha: float = 2.0
    pos_beta: float = 5.0
    neg_shot_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    # normalized entropy H / log2(C) of the images the negative cache takes
    neg_entropy_lower: float = 0.2
    neg_entropy_upper: float = 0.5
    # classes whose stored probability lies strictly inside these bounds are the negatives
    neg_mask_lower: float = 0.03
    neg_mask_upper: float = 1.0
    templates: Optional[list[str]] = None
    ensemble: bool = True

    def __post_init__(self) -> None:
        if self.pos_shot_capacity < 0 or self.neg_shot_capacity < 0:
            raise ValueError("shot capacities must be >= 0 (0 switches that cache off)")
        if not self.neg_entropy_lower <= self.neg_entropy_upper:
            raise ValueError("neg_entropy_lower must be <= neg_entropy_upper")
        check_templates(self.templates)


class ClassCache:
    """Per class, up to ``capacity`` (feature, entropy[, probabilities]) entries, the lowest
    entropies kept; empty slots have entropy +inf."""

    def __init__(self, n_classes: int, capacity: int, dim: int, device, dtype, with_probs: bool):
        self.keys = torch.zeros(n_classes, capacity, dim, device=device, dtype=dtype)
        self.entropy = torch.full((n_classes, capacity), math.inf, device=device)
        self.probs = torch.zeros(n_classes, capacity, n_classes, device=device) if with_probs else None

    def add(self, label: int, feature: torch.Tensor, h: torch.Tensor, probs: Optional[torch.Tensor] = None):
        if self.keys.shape[1] == 0:
            return
        slot = int(self.entropy[label].argmax())  # an empty slot (+inf) or the worst entry
        if h < self.entropy[label, slot]:  # strictly lower, as the original
            self.keys[label, slot] = feature
            self.entropy[label, slot] = h
            if self.probs is not None:
                self.probs[label, slot] = probs

    def affinity_weights(self, feature: torch.Tensor, beta: float) -> torch.Tensor:
        """exp(−β(1 − f·k)) per slot [C, K], 0 for empty slots."""
        w = torch.exp(-beta * (1 - self.keys.float() @ feature.float()))
        return w * torch.isfinite(self.entropy)


@register_method("tda")
class TDA(HandWrittenClassifier):
    Config = TDAConfig
    trainable_kind = "nothing (test-time caches)"
    supports_feature_cache = True  # one view: the frozen features are all it reads
    test_time = "online"

    def __init__(self, config: TDAConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        super().rebuild_classes()  # the hand-written text classifier of the new class list
        self.reset_test_state()

    def reset_test_state(self) -> None:
        self.pos: Optional[ClassCache] = None
        self.neg: Optional[ClassCache] = None

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image in turn: update the caches with it, then classify it with them."""
        return torch.cat([self.step(f) for f in image_features])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward_features(self.image_features_of(x))

    def step(self, feature: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n_classes = self.text_features.shape[0]
        if self.pos is None:
            args = (feature.shape[-1], feature.device, feature.dtype)
            self.pos = ClassCache(n_classes, cfg.pos_shot_capacity, *args, with_probs=False)
            self.neg = ClassCache(n_classes, cfg.neg_shot_capacity, *args, with_probs=True)
        zs = self.backbone.logits(feature[None], self.text_features)[0].float()
        h = entropy(zs)
        label = int(zs.argmax())
        probs = zs.softmax(-1)
        self.pos.add(label, feature, h)
        if cfg.neg_entropy_lower < float(h) / math.log2(n_classes) < cfg.neg_entropy_upper:
            self.neg.add(label, feature, h, probs)
        logits = zs.clone()
        if cfg.pos_shot_capacity:
            logits += cfg.pos_alpha * self.pos.affinity_weights(feature, cfg.pos_beta).sum(1)
        if cfg.neg_shot_capacity:
            w = self.neg.affinity_weights(feature, cfg.neg_beta)  # [C, K]
            negatives = ((self.neg.probs > cfg.neg_mask_lower) & (self.neg.probs < cfg.neg_mask_upper)).float()
            logits -= cfg.neg_alpha * torch.einsum("ck,ckj->j", w, negatives)
        return logits.unsqueeze(0)
