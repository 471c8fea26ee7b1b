"""TaskRes, task residual tuning (Yu et al., CVPR 2023; geekyutao/TaskRes, trainers/taskres.py).

The frozen text classifier ``t`` (per class, the mean of its prompts' raw text features) gets a
learnable residual ``x`` of the same shape: the classifier is ``t + α·x``, normalized, and logits
are CLIP's ``exp(logit_scale) · cos(f, t + α·x)``. ``x`` starts at zero, so before training it is
the zero-shot classifier.

Defaults as the reference code: ``configs/trainers/TaskRes/adam_lr2e-4_B256_ep200_ViT16.yaml``
(recipes/taskres/): Adam lr 2e-4, batch 256, 200 epochs, cosine after one warm-up epoch at 1e-5,
weight decay 5e-4 (Dassl's default), random resized crop + flip. α is its
``TRAINER.TaskRes.RESIDUAL_SCALE``, set per dataset on the command line of scripts/taskres/main.sh
(code default 1.0); 0.5 here, the value CLAP's re-implementation (jusiro/CLAP, ``init_TR``) uses.
Departures: the base classifier uses the dataset's first template (the original: the dataset's
one template, ImageNet adds its 7 "select" templates; ``ensemble: true`` averages all of a
dataset's), and no "enhanced base" (a separately fine-tuned text projection) is loaded. Classes
never trained on (base-to-novel) get a zero residual: their zero-shot classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from adapt.methods.base import Method, check_templates
from adapt.methods.class_rows import ClassRows
from adapt.methods.registry import register_method


@dataclass
class TaskResConfig:
    # α, the residual's scale (RESIDUAL_SCALE)
    alpha: float = 0.5
    templates: Optional[list[str]] = None
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        check_templates(self.templates)


@register_method("taskres")
class TaskRes(Method):
    Config = TaskResConfig
    trainable_kind = "text-classifier residual"
    supports_feature_cache = True

    def __init__(self, config: TaskResConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()
        self.residuals = ClassRows(torch.zeros_like(self.base_text_features), self.classnames)

    def rebuild_classes(self) -> None:
        # t: the raw mean of raw prompt features (TaskRes's _get_base_text_features); never saved
        self.register_buffer("base_text_features", self.hand_written_text_features(raw=True), persistent=False)

    def classifier(self) -> torch.Tensor:
        """Normalized ``t + α·x`` [C, d] for the current classes."""
        x = self.residuals.rows(self.classnames, torch.zeros_like(self.base_text_features))
        return F.normalize(self.base_text_features + self.config.alpha * x, dim=-1)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.classifier())

    def scalars(self) -> dict[str, float]:
        return {"alpha": self.config.alpha}
