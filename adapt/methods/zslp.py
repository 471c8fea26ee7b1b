"""ZS-LP, the zero-shot-initialised linear probe (Silva-Rodríguez et al., CVPR 2024, "A Closer
Look at the Few-Shot Adaptation of Large Vision-Language Models"; jusiro/CLAP,
trainers/adapters.py with ``INIT: ZS``, ``CONSTRAINT: none``).

One prototype per class, initialised with the class's text feature (the mean of its raw prompt
features, as CLAP's ``_get_base_text_features``) and trained; logits are CLIP's:
``exp(logit_scale) · cos(f, w_c)``. Before training it is exactly the zero-shot classifier of the
same templates. Classes it never trained on (base-to-novel novel classes, an adapter re-pointed
at new names) keep their zero-shot prototype.

Training as CLAP's ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml`` (recipes/zslp/): SGD lr 0.1,
batch 256, 300 epochs, cosine, one warm-up epoch at 1e-5, no weight decay, on 20 augmented
views of each training image (``epochs_aumentation = 20``; here ``data.cache_views=20``).
Departure: CLAP's templates are the dataset's single template (ImageNet adds 7 more); here the
dataset's first template, all of them with ``ensemble: true``, or ``templates``.
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
class ZSLPConfig:
    # prompt template(s) of the initial prototypes; null = the dataset's (first, or all: ensemble)
    templates: Optional[list[str]] = None
    ensemble: bool = False

    def __post_init__(self) -> None:
        check_templates(self.templates)


@register_method("zslp")
class ZSLP(Method):
    Config = ZSLPConfig
    trainable_kind = "linear head from zero-shot"
    supports_feature_cache = True

    def __init__(self, config: ZSLPConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()
        self.prototypes = ClassRows(self.zero_shot_prototypes, self.classnames)

    def rebuild_classes(self) -> None:
        # the raw mean of raw text features (what CLAP initialises with); derived, never saved
        self.register_buffer("zero_shot_prototypes", self.hand_written_text_features(raw=True), persistent=False)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        weights = self.prototypes.rows(self.classnames, self.zero_shot_prototypes)
        return self.backbone.logits(image_features, F.normalize(weights, dim=-1))
