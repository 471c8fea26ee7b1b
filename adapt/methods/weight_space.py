"""What the weight-space methods share (LoRA, DoRA, LayerNorm tuning, BitFit): they change the
backbone's own weights or modules and classify with hand-written prompts through it.

Each works on its own clone of the backbone (``Method.changes_backbone``), changes it once in
``change_backbone`` (inject peft layers, unfreeze tensors) and names the tensors it owns there;
``backbone_state`` returns exactly those, by name, for checkpoints and export. The classifier is
CLIP's: normalized image features against the hand-written prompts' text features, recomputed
through the text tower with their graph whenever that tower trains, else computed once per class
list. peft's layers (LoRA's dropout) follow the method's train / eval mode; the rest of the
backbone stays in eval mode.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from adapt.methods.base import HandWrittenClassifier

TOWERS = ("image", "text")


def check_towers(towers: Sequence[str]) -> None:
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers or len(set(towers)) != len(towers):
        raise ValueError(f"towers must be a non-empty list of distinct names from {list(TOWERS)}, got {list(towers)}")


def pick_layers(blocks: list, layers: Optional[Sequence[int]]) -> list:
    """The blocks at ``layers`` (indices, negative from the top; None = all)."""
    if layers is None:
        return list(blocks)
    n = len(blocks)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for a tower of {n} blocks")
    return [blocks[i % n] for i in sorted({i % n for i in layers})]


class BackboneTuning(HandWrittenClassifier):
    """Base of methods that tune the backbone. Subclasses implement ``change_backbone`` and
    give their Config ``towers`` (which towers change), ``logit_scale`` (null = the model's) and
    ``templates``."""

    changes_backbone = True
    supports_feature_cache = False

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        check_towers(config.towers)
        self._owned: list[str] = list(self.change_backbone())
        trainable = {n for n, p in self.backbone.named_parameters() if p.requires_grad}
        if trainable != set(self._owned):  # the names are the contract: checkpoints, export
            raise RuntimeError(f"{self.name}: the backbone's trainable tensors differ from the ones "
                               f"the method names: {sorted(trainable ^ set(self._owned))[:4]}")
        self.rebuild_classes()

    def change_backbone(self) -> list[str]:
        """Change ``self.backbone`` (this method's own clone) and return the names, under
        ``self.backbone``, of the tensors that now train."""
        raise NotImplementedError

    @property
    def text_trains(self) -> bool:
        return "text" in self.config.towers

    def backbone_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self._owned}

    def mode_modules(self) -> list[nn.Module]:
        """Injected modules that follow the method's train / eval mode (dropout)."""
        return []

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.mode_modules():
            module.train(mode)
        return self

    # ------------------------------------------------------------------ classifier -------------
    def rebuild_classes(self) -> None:
        if not hasattr(self, "_owned"):  # during construction, before the backbone changes
            return
        if not self.text_trains:  # frozen text tower: its features once per class list
            super().rebuild_classes()

    def class_text_features(self) -> torch.Tensor:
        if not self.text_trains:
            return self.text_features
        return self.cached_text_features(lambda: self.hand_written_text_features(track_grad=True))

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self.class_text_features()
        if self.config.logit_scale is None:
            return self.backbone.logits(image_features, text)
        return self.config.logit_scale * image_features @ text.to(image_features.dtype).t()
