"""KgCoOp (Yao et al., CVPR 2023): CoOp whose class text features are kept near the hand-written ones.

loss = CE + λ · (1 − mean_c cos(w_c, w_c^clip)), with w_c the learned prompt's text feature of
class c and w_c^clip the frozen text feature of the dataset's hand-written prompt for c. Only the
training loss changes; prediction is CoOp's. The hand-written features are computed once per
class list (lazily, the first time the loss needs them) and never trained.

Reference: htyao89/KgCoOp, trainers/kgcoop.py (W = 8.0 in scripts/base2new_train.sh). Its
hand-written prompt is one template per dataset (``CUSTOM_TEMPLATES``), ImageNet included
("a photo of a {}."; no template ensemble); here the dataset's first template, or all of them
averaged with ``ensemble: true``, or ``templates`` given in the recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from adapt.methods.base import check_templates
from adapt.methods.coop import CoOp, CoOpConfig
from adapt.methods.registry import register_method


@dataclass
class KgCoOpConfig(CoOpConfig):
    # configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml (CTX_INIT True -> "a photo of a", M=4)
    n_ctx: Optional[int] = None
    ctx_init: str = "a photo of a"
    # λ, the weight of the knowledge-guided term (TRAINER.COOP.W = 8.0)
    weight: float = 8.0
    # hand-written prompt(s) instead of the dataset's; several are averaged (normalized) per class
    templates: Optional[list[str]] = None
    # with the dataset's templates: the first only (the original) or the mean over all of them
    ensemble: bool = False
    DEFAULT_N_CTX: ClassVar[int] = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight < 0:
            raise ValueError(f"weight (λ) must be >= 0, got {self.weight}")
        check_templates(self.templates)


@register_method("kgcoop")
class KgCoOp(CoOp):
    Config = KgCoOpConfig

    def __init__(self, config: KgCoOpConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self._train_text: Optional[torch.Tensor] = None  # this step's class text features

    def rebuild_classes(self) -> None:
        super().rebuild_classes()
        # derived from the class names: non-persistent, recomputed for a new class list
        self.register_buffer("handcrafted_features", None, persistent=False)

    def handcrafted(self) -> torch.Tensor:
        """Frozen text features [C, d] of the hand-written prompts of the current classes."""
        if self.handcrafted_features is None:
            self.register_buffer("handcrafted_features", self.hand_written_text_features(), persistent=False)
        return self.handcrafted_features

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        # keep this step's text features for the loss, which would otherwise encode them again
        # (whenever they carry gradients: Lightning does not switch modules to train mode itself)
        self._train_text = text if torch.is_grad_enabled() else None
        return self.backbone.logits(image_features, text)

    def knowledge_loss(self, text_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """1 − mean over classes of cos(learned text feature, hand-written text feature)."""
        text = self.prompts.text_features() if text_features is None else text_features
        anchor = self.handcrafted().to(device=text.device, dtype=text.dtype)
        return 1.0 - F.cosine_similarity(text, anchor, dim=-1).mean()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        text, self._train_text = self._train_text, None
        ce = super().loss(logits, labels)
        if self.config.weight == 0:
            return ce
        return ce + self.config.weight * self.knowledge_loss(text)
