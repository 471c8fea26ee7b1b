"""KgCoOp (Yao et al., CVPR 2023): CoOp whose class text features are kept near the hand-written ones.

loss = CE + λ · (1 − mean_c cos(w_c, w_c^clip)), with w_c the learned prompt's text feature of
class c and w_c^clip the frozen text feature of the dataset's hand-written prompt for c. Only the
training loss changes; prediction is CoOp's. The hand-written features are computed once per
class list (lazily, the first time the loss needs them) and never trained. The loss reads the
learned text features of the same forward pass from its output (``MethodOutput.tensors``) and
reports both terms as scalars (``ce``, ``kg``).

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

from adapt.methods.base import HandWrittenAnchor, MethodOutput, as_output, check_templates
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
class KgCoOp(HandWrittenAnchor, CoOp):
    Config = KgCoOpConfig
    trainable_kind = "text context"

    def output(self, x: torch.Tensor) -> MethodOutput:
        # the text features of this step go to the loss, which would otherwise encode them again
        text = self.text_features()
        return MethodOutput(self.forward_features(self.image_features_of(x), text), {"text_features": text})

    def forward_features(self, image_features: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features() if text is None else text)

    def knowledge_loss(self, text_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """1 − mean over classes of cos(learned text feature, hand-written text feature)."""
        text = self.prompts.text_features() if text_features is None else text_features
        anchor = self.handcrafted().to(device=text.device, dtype=text.dtype)
        return 1.0 - F.cosine_similarity(text, anchor, dim=-1).mean()

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        ce = F.cross_entropy(out.logits, labels)
        if self.config.weight == 0:
            return ce
        kg = self.knowledge_loss(out.tensors.get("text_features"))
        out.scalars.update(ce=ce.detach(), kg=kg.detach())
        return ce + self.config.weight * kg
