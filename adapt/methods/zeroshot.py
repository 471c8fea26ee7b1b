"""Zero-shot CLIP: one hand-written template, or the mean of several (prompt ensembling)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from adapt.methods.base import HandWrittenClassifier, check_templates
from adapt.methods.registry import register_method


@dataclass
class ZeroShotConfig:
    # templates to use instead of the dataset's; several = ensemble of normalized embeddings
    templates: Optional[list[str]] = None
    # with the dataset's templates: use only the first (the protocol's single template) or all
    ensemble: bool = False

    def __post_init__(self) -> None:
        check_templates(self.templates)


@register_method("zeroshot")
class ZeroShot(HandWrittenClassifier):
    Config = ZeroShotConfig
    trainable_kind = "nothing"
    supports_feature_cache = True
    # multi-label: each class scores logit_scale · cos on its own; the task ranks them per class
    # (mAP) and thresholds their sigmoid
    tasks = ("single_label", "multi_label")

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features)
