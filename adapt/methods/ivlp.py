"""IVLP, independent vision-language prompting (the deep baseline of MaPLe, CVPR 2023, and of
PromptSRC, ICCV 2023): separate learnable deep prompts in the text and the image tower."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapt.methods.base import Method
from adapt.methods.deep_prompts import DeepTextPrompts, DeepVisionPrompts, encode_prompted_images
from adapt.methods.registry import register_method


@dataclass
class IVLPConfig:
    # tokens per layer in each tower (MaPLe repo: configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml)
    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    # blocks receiving prompts, from the first; capped at each tower's depth. 0 = no prompts in
    # that tower (text depth 0 = the hand-written prompt "<ctx_init> <class>.")
    text_depth: int = 9
    vision_depth: int = 9
    # layer-0 text context: the first n_ctx_text tokens of this text are learnable, the rest of it
    # stays in the prompt (2 tokens: "a photo" learnable, "of a" fixed); "" = random N(0, 0.02)
    ctx_init: str = "a photo of a"
    # deeper text tokens and all vision tokens: N(0, init_std)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("n_ctx_text", "n_ctx_vision", "text_depth", "vision_depth"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


@register_method("ivlp")
class IVLP(Method):
    Config = IVLPConfig
    trainable_kind = "deep text + vision prompts"

    def __init__(self, config: IVLPConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.text = DeepTextPrompts(backbone, config.n_ctx_text, config.text_depth, config.ctx_init,
                                    config.init_std)
        self.vision = DeepVisionPrompts(backbone, config.n_ctx_vision, config.vision_depth, config.init_std)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.text.build(self.classnames)

    def text_features(self) -> torch.Tensor:
        return self.cached_text_features(self.text.features)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return encode_prompted_images(self.backbone, images, self.vision.layers())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(self.image_features(images), self.text_features())
