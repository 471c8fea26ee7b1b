"""MaskCLIP (Zhou, Loy and Dai, ECCV 2022, "Extract Free Dense Labels from CLIP"): training-free
semantic segmentation from a frozen CLIP. Nothing is trained.

The last block's attention is replaced by each token attending only to itself, the value path
(``adapt/dense.py``: ``x + out_proj(W_v ln_1(x) + b_v)``, then the block's MLP residual, then
``ln_post`` and the projection, as ``mmseg/models/backbones/vit.py`` with ``return_qkv`` and
``maskclip_head.py:MaskClipHead`` of chongzhou96/MaskCLIP@245d31f compute it). With ``f(h, w)``
that feature at each patch, L2-normalised, and ``t_k`` the zero-shot classifier::

    logits_k(h, w) = f̂(h, w) · t̂_k                  (cosine, no scale: ``cls_seg``)

upsampled bilinearly to the label map (the segmentation task does it) and arg-maxed. The text
classifier is the original's prompt engineering (``tools/maskclip_utils/prompt_engineering.py``):
its 85 templates (CLIP's 80 ImageNet ones and five "in the scene" ones, shipped as
``adapt/methods/data/maskclip_templates.txt``), each template's embeddings normalised, averaged
over templates, renormalised. At test time the original resizes the image keep-ratio to its
short side (512) and interpolates the positional embedding bicubically; the segmentation task's
evaluation transform and ``encode_image_dense`` do the same at the backbone's resolution (or
``data.image_size``).

Prompt denoising (``pd_thresh``, off by default as in the base ``configs/maskclip/`` configs;
0.5 in its ``*_kspd_*`` ones): a class whose largest per-pixel probability
``softmax(100 · logits)`` over the image stays below the threshold gets logit −100 everywhere,
as ``refine_output`` does.

Departures from the original, deliberate:

* **Key smoothing** (``ks_thresh``) is not offered: it needs the last block's keys, which the
  dense call does not return (and the original normalises them over the positions, ``dim=1``
  of [N, HW, C], which reads as a slip). A later dense output can add it.
* **Exact CLIP blocks.** The original's mmcv ViT uses exact GELU and LayerNorm eps 1e-6 with
  ImageNet's mean / std; here the open_clip model runs as it was trained (its own activation,
  eps and normalisation), which is what the weights expect.
* ``template_set: dataset`` uses the dataset's own templates instead of the 85 (the world's
  tiny CLIP was trained on its own captions, not on ImageNet's templates).
* ``features: tokens`` reads the last block's ordinary patch tokens instead of the value path
  (the ablation of the paper's Table 1, where they segment poorly).
* MaskCLIP+ (a DeepLab student trained on these pseudo-labels) is not here: it is a separate
  network and training recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

import torch
import torch.nn.functional as F

from adapt.methods.base import HandWrittenClassifier, check_templates
from adapt.methods.registry import register_method

FEATURES = ("value", "tokens")
TEMPLATE_SETS = ("maskclip", "dataset")


@lru_cache(maxsize=1)
def _maskclip_templates() -> tuple[str, ...]:
    text = resources.files("adapt.methods").joinpath("data/maskclip_templates.txt").read_text()
    return tuple(line for line in text.splitlines() if line.strip())


def maskclip_templates() -> list[str]:
    """The original's 85 prompt templates, in its order."""
    return list(_maskclip_templates())


@dataclass
class MaskClipConfig:
    # which dense output is classified: MaskCLIP's value path, or the plain last-block tokens
    features: str = "value"
    # the text classifier's templates: the original's 85 ("maskclip") or the dataset's
    # ("dataset"); ``templates`` overrides both
    template_set: str = "maskclip"
    templates: Optional[list[str]] = None
    # prompt denoising: drop a class whose best pixel's probability is below this (0 = off)
    pd_thresh: float = 0.0

    def __post_init__(self) -> None:
        check_templates(self.templates)
        if self.features not in FEATURES:
            raise ValueError(f"method.features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.template_set not in TEMPLATE_SETS:
            raise ValueError(f"method.template_set must be one of {', '.join(TEMPLATE_SETS)}, "
                             f"got {self.template_set!r}")
        if not 0.0 <= self.pd_thresh < 1.0:
            raise ValueError(f"method.pd_thresh must be in [0, 1), got {self.pd_thresh}")


def prompt_denoise(logits: torch.Tensor, thresh: float) -> torch.Tensor:
    """``refine_output``'s prompt denoising on [B, K, h, w] cosine logits."""
    best = F.softmax(100.0 * logits, dim=1).flatten(2).max(dim=-1).values  # [B, K]
    return logits.masked_fill((best < thresh)[:, :, None, None], -100.0)


@register_method("maskclip")
class MaskClip(HandWrittenClassifier):
    Config = MaskClipConfig
    trainable_kind = "nothing"
    tasks = ("segmentation",)

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()

    def hand_written_templates(self) -> list[str]:
        if self.config.templates:
            return list(self.config.templates)
        return maskclip_templates() if self.config.template_set == "maskclip" else list(self.templates)

    def dense_map(self, images: torch.Tensor) -> torch.Tensor:
        """The classified features [B, d, h, w], L2-normalised over d, on the image's own grid."""
        with torch.no_grad():
            dense = self.backbone.encode_image_dense(images, outputs=(self.config.features,), normalize=False)
        return F.normalize(dense.as_map(self.config.features), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch cosine logits [B, K, h, w]."""
        f = self.dense_map(images)
        logits = torch.einsum("bdhw,kd->bkhw", f, self.text_features.to(f.dtype))
        return prompt_denoise(logits, self.config.pd_thresh) if self.config.pd_thresh > 0 else logits
