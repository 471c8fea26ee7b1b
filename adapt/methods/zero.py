"""Zero (Farina et al., NeurIPS 2024): test-time augmentation at zero temperature, no gradients.

Per test image: TPT's 64 views (``adapt.methods.views``), zero-shot logits of each, keep the
γ = 0.3 most confident share (lowest entropy of the softmax at CLIP's temperature; int(64·0.3) =
19 views), and predict by a vote: each kept view's argmax counts once (the softmax at zero
temperature is one-hot). Forward passes only. FarinaMatteo/zero, ttas/zero.py.

Ties between classes are broken as the original's ``greedy_break``: the first of the discarded
views (most confident first) whose argmax is a tied class decides, and the winner gets one more
vote. Departures: when no discarded view votes for a tied class (or none was discarded, γ = 1),
the tie goes to the tied class with the highest logit of the most confident remaining view (of
the most confident view when none remains); the original's fallback indexes with ``~`` on an
integer tensor, which does not select the tied classes. The kept share is at least one view.

The returned scores are the vote counts [B, C] (argmax = the prediction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from adapt.methods.base import HandWrittenClassifier, check_templates, is_features
from adapt.methods.registry import register_method
from adapt.methods.views import ViewConfig, confident, entropy, test_views, with_view_seed


@dataclass
class ZeroConfig(ViewConfig):
    # share of the views kept by confidence (the paper's γ)
    gamma: float = 0.3
    # the classifier's templates; null = the dataset's first (Zero's "a photo of a {}.")
    templates: Optional[list[str]] = None
    ensemble: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        check_templates(self.templates)


@register_method("zero")
class Zero(HandWrittenClassifier):
    Config = ZeroConfig
    trainable_kind = "nothing (test-time vote)"
    test_time = "episodic"

    def __init__(self, config: ZeroConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()

    def setup(self, datamodule) -> None:
        self.config = with_view_seed(self.config, datamodule)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits (no views)."""
        return self.backbone.logits(image_features, self.text_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if is_features(x):
            raise ValueError("zero augments each test image, so it needs images, not cached features")
        with torch.no_grad():
            return torch.cat([self.vote(image) for image in x])

    def vote(self, image: torch.Tensor) -> torch.Tensor:
        """Vote counts [1, C] of one image [C, H, W] over its confident views."""
        views = test_views(image, self.config, self.backbone.image_mean, self.backbone.image_std)
        logits = self.forward_features(self.backbone.encode_image(views)).float()
        order = torch.argsort(entropy(logits))  # most confident first
        kept = confident(logits, self.config.gamma)
        counts = torch.bincount(logits[kept].argmax(-1), minlength=logits.shape[-1]).float()
        ties = (counts == counts.max()).nonzero().flatten()
        if len(ties) > 1:
            rest = logits[order[len(kept):]]
            votes = [int(c) for c in rest.argmax(-1) if c in ties]
            if votes:
                winner = votes[0]
            else:
                first = rest[0] if len(rest) else logits[order[0]]
                winner = int(ties[first[ties].argmax()])
            counts[winner] += 1
        return counts.unsqueeze(0)
