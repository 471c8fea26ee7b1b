"""MaPLe, multi-modal prompt learning (Khattak et al., CVPR 2023).

Deep text prompts at the first ``depth`` blocks of the text tower; the vision prompts of each of
those layers are produced from that layer's text prompts by the layer's own coupling function
``Linear(text_width, vision_width)``, and appended after the patch tokens of the image tower.
Only the text prompts and the couplings are learned.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from adapt.methods.base import Method
from adapt.methods.deep_prompts import DeepTextPrompts, capped_depth, encode_prompted_images
from adapt.methods.registry import register_method


@dataclass
class MaPLeConfig:
    # prompt tokens per layer (MaPLe repo, configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: N_CTX 2)
    n_ctx: int = 2
    # layers prompted in both towers, from the first (PROMPT_DEPTH 9); capped at the shallower
    # tower; 0 = no prompts at all (the hand-written prompt with the frozen image encoder)
    depth: int = 9
    # the prompt reads this text; its first n_ctx tokens are the learnable layer-0 context
    # ("a photo" learnable, "of a" a fixed part of the prompt); "" = random N(0, 0.02) context
    ctx_init: str = "a photo of a"
    # deeper text prompts: N(0, init_std)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_ctx < 0 or self.depth < 0:
            raise ValueError(f"n_ctx and depth must be >= 0, got n_ctx={self.n_ctx}, depth={self.depth}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


@register_method("maple")
class MaPLe(Method):
    Config = MaPLeConfig
    trainable_kind = "deep text prompts + vision couplings"

    def __init__(self, config: MaPLeConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        depth = 0
        if config.n_ctx > 0 and config.depth > 0:
            # vision_depth raises the backbone's TypeError for non-ViT image towers
            depth = capped_depth(config.depth, min(backbone.text_depth, backbone.vision_depth))
        self.text = DeepTextPrompts(backbone, config.n_ctx, depth, config.ctx_init, config.init_std)
        self.couplings = nn.ModuleList(_couplings(backbone, depth))
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.text.build(self.classnames)

    def vision_layers(self) -> list[torch.Tensor]:
        """Layer i's vision prompts = coupling_i(layer i's text prompts)."""
        return [f(p) for f, p in zip(self.couplings, self.text.layers())]

    def text_features(self) -> torch.Tensor:
        return self.cached_text_features(self.text.features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = encode_prompted_images(self.backbone, images, self.vision_layers())
        return self.backbone.logits(image_features, self.text_features())


def _couplings(backbone, depth: int) -> list[nn.Linear]:
    """One Linear per prompted layer. As in MaPLe's code, layer 0's has its own default init and
    the deeper layers' start as copies of one freshly initialised Linear."""
    if depth == 0:
        return []
    make = lambda: nn.Linear(backbone.text_width, backbone.vision_width)  # noqa: E731
    first, deeper = make(), make()
    layers = [first] + [copy.deepcopy(deeper) for _ in range(depth - 1)]
    device = backbone.logit_scale.device
    return [layer.to(device=device, dtype=backbone.dtype) for layer in layers]
