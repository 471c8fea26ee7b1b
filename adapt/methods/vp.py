"""VP, visual prompting (Bahng et al., 2022, "Exploring Visual Prompts for Adapting Large-Scale
Models"): a learnable frame of ``pad`` pixels added to the normalized image; the frozen CLIP
classifies the prompted image with its zero-shot text classifier.

The prompt is four learnable strips (top and bottom ``pad × S``, left and right ``(S − 2·pad) × pad``,
3 channels; hjbahng/visual_prompting, models/prompters.py ``PadPrompter``); the centre of the image
is never changed. It only edits pixels, so it runs on any image tower (ViT or ResNet).

Image size: the original's 30 px frame is for 224 px inputs. For another input size S the width is
scaled to ``round(pad · S / reference_size)`` (e.g. 4 px at 32 px) and clamped to ``(S − 1) // 2`` so
at least a one-pixel centre always remains (``scale_pad: false`` keeps ``pad`` as given, still
clamped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from adapt.methods.base import HandWrittenClassifier, check_templates
from adapt.methods.registry import register_method


@dataclass
class VPConfig:
    # frame width in pixels at reference_size (main_clip.py: --prompt_size 30, --image_size 224)
    pad: int = 30
    reference_size: int = 224
    # scale the width with the backbone's input size (see the module docstring)
    scale_pad: bool = True
    # the original initialises the strips with torch.randn (N(0, 1) on normalized pixels);
    # 0 starts from the zero-shot model exactly
    init_std: float = 1.0
    # text classifier: given templates, else the dataset's first template (false) or the mean over
    # all of them (true). The original uses "This is a photo of a {}" for CIFAR-100.
    templates: Optional[list[str]] = None
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0 pixels, got {self.pad}")
        if self.reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {self.reference_size}")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        check_templates(self.templates)


def frame_width(pad: int, image_size: int, reference_size: int = 224, scale: bool = True) -> int:
    """The frame width used at ``image_size``: scaled, at least 1 when ``pad > 0``, and at most
    ``(image_size − 1) // 2`` so the frame never covers the whole image."""
    if pad == 0:
        return 0
    width = max(1, round(pad * image_size / reference_size)) if scale else pad
    return min(width, (image_size - 1) // 2)


@register_method("vp")
class VP(HandWrittenClassifier):
    Config = VPConfig
    trainable_kind = "pixel frame"

    def __init__(self, config: VPConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        size = self.image_size = int(backbone.image_size)
        pad = self.pad = frame_width(config.pad, size, config.reference_size, config.scale_pad)
        if config.pad > 0 and pad == 0:
            raise ValueError(f"a {size} px image has no room for a padding prompt and a centre")
        device, dtype = backbone.logit_scale.device, backbone.dtype

        def strip(h: int, w: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(1, 3, h, w, device=device).mul_(config.init_std).to(dtype))

        self.pad_up, self.pad_down = strip(pad, size), strip(pad, size)
        self.pad_left, self.pad_right = strip(size - 2 * pad, pad), strip(size - 2 * pad, pad)
        self.rebuild_classes()

    def prompt(self) -> torch.Tensor:
        """The full-size prompt [1, 3, S, S]: the learnable frame around a zero centre."""
        size, pad = self.image_size, self.pad
        centre = self.pad_up.new_zeros(1, 3, size - 2 * pad, size - 2 * pad)
        middle = torch.cat([self.pad_left, centre, self.pad_right], dim=3)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)

    def apply_prompt(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, 3, S, S] plus the prompt."""
        if tuple(images.shape[-3:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"vp's prompt was built for 3x{self.image_size}x{self.image_size} inputs (the backbone's "
                f"size), got {tuple(images.shape[1:])}; leave data.image_size unset")
        return images + self.prompt().to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.encode_image(self.apply_prompt(images))
        return self.backbone.logits(feats, self.text_features)
