"""CLIP-Adapter (Gao et al., IJCV 2023; gaopengcuhk/CLIP-Adapter, clip_adapter.py): a residual
bottleneck MLP on the frozen image feature, then CLIP's logits with the frozen text classifier.

    A(f) = ReLU(W₂ · ReLU(W₁ · f)),   W₁: d → d/4, W₂: d/4 → d, no biases
    f'   = ratio · A(f) + (1 − ratio) · f        on the *unnormalized* image feature
    logits = exp(logit_scale) · cos(f', t_c)

with ``t_c`` the hand-written prompt's text feature. ``ratio`` 0.2 and reduction 4 are the
original's; the original hard-codes the width 1024 (RN50's embedding), here it is the backbone's
``embed_dim``. PyTorch's default Linear init, as the original. (Without biases A is positively
homogeneous, so blending the raw or the normalized feature gives the same logits; the raw one is
kept, as the original.) With ``ratio: 0`` it is zero-shot
CLIP. The released trainer builds its optimizer from CoOp's configs (its README: put the file
in CoOp's trainers/ and run CoOp's command): SGD lr 0.002, batch 32, 200 epochs, cosine after one
constant warm-up epoch (recipes/clipadapter/). Only the visual adapter is implemented (the
paper's best variant; the released code has no text adapter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import HandWrittenClassifier, check_templates
from adapt.methods.registry import register_method


@dataclass
class CLIPAdapterConfig:
    # residual ratio: weight of the adapted feature in the blend (the original's 0.2)
    ratio: float = 0.2
    # bottleneck width = embed_dim // reduction (Adapter(1024, 4))
    reduction: int = 4
    # text classifier templates (the original: the dataset's single CUSTOM_TEMPLATES entry)
    templates: Optional[list[str]] = None
    ensemble: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        check_templates(self.templates)


@register_method("clipadapter")
class CLIPAdapter(HandWrittenClassifier):
    Config = CLIPAdapterConfig
    trainable_kind = "image-feature bottleneck"
    supports_feature_cache = True
    normalize_features = False  # the blend is on the encoder's raw output

    def __init__(self, config: CLIPAdapterConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        d = backbone.embed_dim
        hidden = d // config.reduction
        if hidden < 1:
            raise ValueError(f"adapter width {d} // {config.reduction} is 0; lower reduction")
        self.adapter = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, d, bias=False), nn.ReLU()).to(
            device=backbone.logit_scale.device, dtype=backbone.dtype)
        self.rebuild_classes()

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        f = image_features.to(self.adapter[0].weight.dtype)
        ratio = self.config.ratio
        blended = ratio * self.adapter(f) + (1 - ratio) * f
        return self.backbone.logits(F.normalize(blended, dim=-1), self.text_features)

    def scalars(self) -> dict[str, float]:
        return {"ratio": self.config.ratio}
