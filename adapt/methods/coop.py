"""CoOp (Zhou et al., IJCV 2022): learn the prompt's context words, keep CLIP frozen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from adapt.methods.base import Method
from adapt.methods.prompts import ContextPrompts, check_context_config, check_init_length, n_ctx_of
from adapt.methods.registry import register_method


@dataclass
class CoOpConfig:
    # M context vectors; null = the token count of ctx_init, or DEFAULT_N_CTX without it (a value
    # that disagrees with ctx_init is an error: the text sets M)
    n_ctx: Optional[int] = None
    # "" = random N(0, 0.02) init (the paper's main setting); e.g. "a photo of a" (M=4)
    ctx_init: str = ""
    # class-specific context (one set per class) instead of one shared set
    csc: bool = False
    class_token_position: str = "end"  # end | middle | front
    init_std: float = 0.02
    DEFAULT_N_CTX: ClassVar[int] = 16  # the paper's M for random initialisation

    def __post_init__(self) -> None:
        check_context_config(self.n_ctx, self.ctx_init, self.class_token_position)


@register_method("coop")
class CoOp(Method):
    Config = CoOpConfig
    trainable_kind = "text context"
    supports_feature_cache = True

    def __init__(self, config: CoOpConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.repointable = not config.csc
        self.repoint_fix = "method.csc=false"
        self.prompts = self.make_prompts(config, self.backbone)  # the method's own clone when it changes it
        self.rebuild_classes()

    def make_prompts(self, config: CoOpConfig, backbone) -> ContextPrompts:
        """The learned context; a variant that initialises it otherwise overrides this (ProGrad)."""
        prompts = ContextPrompts(backbone, n_ctx_of(config), config.ctx_init, config.csc,
                                 config.class_token_position, len(self.classnames), config.init_std)
        check_init_length(config.n_ctx, config.ctx_init, prompts)
        return prompts

    def rebuild_classes(self) -> None:
        self.prompts.build(self.classnames)

    def text_features(self) -> torch.Tensor:
        return self.cached_text_features(self.prompts.text_features)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features())
