"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context plus a meta-net that shifts it per image.

A small bottleneck MLP (``Linear(d, d/16) - ReLU - Linear(d/16, ctx_dim)``) maps the normalized
image feature to one vector that is added to every context vector, so each image gets its own
prompts for all classes. The original encodes them in a Python loop over the images of a batch
(and trains at batch size 1); here a batch of B images and C classes is one text-tower pass of
B·C prompts, and logits come from ``backbone.logits(image [B, d], text [B, C, d])``.

The image features are the frozen encoder's, so CoCoOp trains on cached features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from adapt.methods.base import Method
from adapt.methods.prompts import ContextPrompts, check_context_config, check_init_length, n_ctx_of
from adapt.methods.registry import register_method


@dataclass
class CoCoOpConfig:
    # KaiyangZhou/CoOp, configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: N_CTX 4,
    # CTX_INIT "a photo of a" (the text's tokens set M; n_ctx null = that count, or
    # DEFAULT_N_CTX with ctx_init ""; a value that disagrees with ctx_init is an error)
    n_ctx: Optional[int] = None
    ctx_init: str = "a photo of a"
    # the original always puts the class name at the end
    class_token_position: str = "end"
    init_std: float = 0.02
    # meta-net hidden width = image feature dim // reduction (trainers/cocoop.py: vis_dim // 16)
    reduction: int = 16
    # memory bound, not a paper setting: at most this many image-conditioned prompts (images x
    # classes) are built per text-tower call; a larger batch is split into groups of whole images
    # (identical results). 0 = the whole batch at once
    max_prompts_per_pass: int = 8192
    DEFAULT_N_CTX: ClassVar[int] = 4

    def __post_init__(self) -> None:
        check_context_config(self.n_ctx, self.ctx_init, self.class_token_position)
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if self.max_prompts_per_pass < 0:
            raise ValueError(f"max_prompts_per_pass must be >= 0 (0 = no limit), got {self.max_prompts_per_pass}")


@register_method("cocoop")
class CoCoOp(Method):
    Config = CoCoOpConfig
    supports_feature_cache = True

    def __init__(self, config: CoCoOpConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.prompts = ContextPrompts(backbone, n_ctx_of(config), config.ctx_init, False,
                                      config.class_token_position, len(self.classnames), config.init_std)
        check_init_length(config.n_ctx, config.ctx_init, self.prompts)
        vis_dim, ctx_dim = backbone.embed_dim, backbone.text_width
        hidden = vis_dim // config.reduction
        if hidden < 1:
            raise ValueError(f"meta-net hidden width {vis_dim} // {config.reduction} is 0; lower reduction")
        # PyTorch's default Linear initialisation, as the original
        self.meta_net = nn.Sequential(nn.Linear(vis_dim, hidden), nn.ReLU(), nn.Linear(hidden, ctx_dim)).to(
            device=backbone.logit_scale.device, dtype=backbone.dtype)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.prompts.build(self.classnames)

    def image_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context [B, M, D]: the shared context shifted by the meta-net's output."""
        bias = self.meta_net(image_features.to(self.prompts.ctx.dtype))
        return self.prompts.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        # image_features are the frozen encoder's normalized features (the original normalizes
        # them before the meta-net, too)
        n_cls, limit = len(self.classnames), self.config.max_prompts_per_pass
        group = len(image_features) if limit == 0 else max(1, limit // n_cls)
        logits = []
        for feats in image_features.split(group):  # one group unless B·C exceeds the limit
            text = self.prompts.text_features_per_image(self.image_context(feats))
            logits.append(self.backbone.logits(feats, text))
        return torch.cat(logits)
