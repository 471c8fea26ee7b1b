"""VPT (Jia et al., ECCV 2022) on CLIP's image tower, as the CLIP prompt-learning papers run it
(MaPLe's VPT baseline): learnable tokens in the vision sequence, frozen zero-shot text classifier.

* shallow (``depth=1``): tokens appended at the input, carried through every block;
* deep (``depth>1``): new tokens before each of the first ``depth`` blocks, replacing the previous
  layer's (``depth=12`` on ViT-B = every layer, the reference setting).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapt.methods.base import HandWrittenClassifier
from adapt.methods.deep_prompts import DeepVisionPrompts, encode_prompted_images
from adapt.methods.registry import register_method


@dataclass
class VPTConfig:
    # tokens per layer (MaPLe repo, configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml: N_CTX_VISION 8)
    n_tokens: int = 8
    # blocks receiving new tokens: 0 = none (zero-shot CLIP), 1 = VPT-shallow, 12 = VPT-deep on
    # ViT-B (PROMPT_DEPTH_VISION 12); capped at the tower's number of blocks
    depth: int = 12
    # N(0, 0.02) as in MaPLe's VPT code (the original VPT used a Xavier-uniform init)
    init_std: float = 0.02
    # text classifier: the dataset's single template (false) or the mean over all its templates
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {self.n_tokens}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0 (1 = shallow, >1 = deep), got {self.depth}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def deep(self) -> bool:
        return self.depth > 1


@register_method("vpt")
class VPT(HandWrittenClassifier):
    Config = VPTConfig
    trainable_kind = "vision prompts"

    def __init__(self, config: VPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.vision = DeepVisionPrompts(backbone, config.n_tokens, config.depth, config.init_std)
        self.rebuild_classes()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = encode_prompted_images(self.backbone, images, self.vision.layers())
        return self.backbone.logits(feats, self.text_features)
