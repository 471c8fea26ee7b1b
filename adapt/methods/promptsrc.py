"""PromptSRC, self-regulating prompts (Khattak et al., ICCV 2023).

IVLP's deep prompts in both towers, regularised towards the frozen model (as in the reference
code, trainers/promptsrc.py):

    loss = CE + 25 · L1(text, frozen text) + 10 · L1(image, frozen image)
              + KL(softmax(zero-shot logits) ‖ softmax(logits)) summed / (batch · classes), T = 1

where the frozen text features are the normalized mean of the *unnormalized* text features over
several templates ("textual diversity"), and the zero-shot logits are those of the frozen image
features with them. After every epoch the prompts are added to a Gaussian-weighted average over
epochs (GPA, weight ∝ N(epoch; gpa_mean, gpa_std), epochs counted from 1); at the end of fitting
the averaged prompts replace the trained ones, and they are what is evaluated and exported.

The teacher templates default to the 60 CLIP ImageNet templates the reference code always uses
(trainers/imagenet_templates.py), shipped as ``adapt/methods/data/imagenet_templates.txt``;
``teacher_templates: null`` uses the dataset's templates instead. The training forward returns
the prompted and frozen features with its logits (``output``); the loss reads them there and
reports its four terms as scalars.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import MethodOutput, as_output, check_templates, text_feature_mean
from adapt.methods.ivlp import IVLP, IVLPConfig
from adapt.methods.registry import register_method


@lru_cache(maxsize=1)
def _imagenet_templates() -> tuple[str, ...]:
    text = resources.files("adapt.methods").joinpath("data/imagenet_templates.txt").read_text()
    return tuple(line for line in text.splitlines() if line.strip())


def imagenet_templates() -> list[str]:
    """CLIP's 60 ImageNet prompt templates (PromptSRC's teacher, the zero-shot ensemble of CLIP)."""
    return list(_imagenet_templates())


@dataclass
class PromptSRCConfig(IVLPConfig):
    # PromptSRC repo, configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml
    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    text_depth: int = 9
    vision_depth: int = 9
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    logit_loss_weight: float = 1.0
    # templates of the frozen text features: the reference code's 60 CLIP ImageNet templates,
    # whatever the dataset; null = the dataset's templates
    teacher_templates: Optional[list[str]] = field(default_factory=imagenet_templates)
    # Gaussian prompt aggregation over epochs: base-to-novel 20 epochs with mean 15, std 1;
    # few-shot 50 epochs with mean 30, std 30 (or 45, 5 for fine-grained datasets)
    gpa: bool = True
    gpa_mean: float = 15.0
    gpa_std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.text_loss_weight, self.image_loss_weight, self.logit_loss_weight) < 0:
            raise ValueError("text_loss_weight, image_loss_weight and logit_loss_weight must be >= 0")
        if self.gpa_std <= 0:
            raise ValueError(f"gpa_std must be > 0, got {self.gpa_std}")
        check_templates(self.teacher_templates, "teacher_templates")


def gpa_weights(max_epochs: int, mean: float, std: float) -> list[float]:
    """Normalized Gaussian weights of epochs 1..max_epochs (computed stably in log space)."""
    logs = [-0.5 * ((a - mean) / std) ** 2 for a in range(1, max_epochs + 1)]
    top = max(logs)
    w = [math.exp(v - top) for v in logs]
    return [v / sum(w) for v in w]


@register_method("promptsrc")
class PromptSRC(IVLP):
    Config = PromptSRCConfig
    trainable_kind = "deep text + vision prompts"
    per_task_loss = False  # its KL to the frozen model's logits reads every class

    def __init__(self, config: PromptSRCConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        # the running GPA sums are persistent buffers, so a resumed run keeps them
        self._gpa_names = [n for n, p in self.named_parameters() if p.requires_grad]
        self.gpa = nn.Module()
        for name in self._gpa_names:
            self.gpa.register_buffer(_key(name), torch.zeros_like(self.get_parameter(name)))
        self.gpa.register_buffer("total_weight", torch.zeros((), dtype=torch.float64))

    def rebuild_classes(self) -> None:
        super().rebuild_classes()
        # computed at the first training step (evaluation never needs it)
        self.register_buffer("teacher_features", None, persistent=False)

    def teacher_text_features(self) -> torch.Tensor:
        """Frozen text features: normalized mean of unnormalized features over the templates."""
        if self.teacher_features is None:
            templates = self.config.teacher_templates or self.templates
            self.teacher_features = text_feature_mean(self.backbone, self.classnames, templates,
                                                      normalize_each=False)
        return self.teacher_features

    def output(self, images: torch.Tensor) -> MethodOutput:
        text, image = self.text_features(), self.image_features(images)
        with torch.no_grad():
            frozen = self.backbone.encode_image(images)
        return MethodOutput(self.backbone.logits(image, text),
                            {"text_features": text, "image_features": image, "frozen_image_features": frozen})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        logits = out.logits
        ce = F.cross_entropy(logits, labels)
        if "frozen_image_features" not in out.tensors:  # bare logits: plain cross-entropy
            return ce
        text, image, frozen_image = (out.tensors[k] for k in ("text_features", "image_features",
                                                              "frozen_image_features"))
        cfg, teacher = self.config, self.teacher_text_features()
        l_text = F.l1_loss(text, teacher.to(text.dtype))
        l_image = F.l1_loss(image, frozen_image.to(image.dtype))
        zs_logits = self.backbone.logits(frozen_image, teacher)
        l_logits = F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(zs_logits.float(), dim=1),
                            reduction="sum", log_target=True) / logits.numel()
        out.scalars.update(ce=ce.detach(), text_l1=l_text.detach(), image_l1=l_image.detach(),
                           logits_kl=l_logits.detach())
        return (ce + cfg.text_loss_weight * l_text + cfg.image_loss_weight * l_image
                + cfg.logit_loss_weight * l_logits)

    # ------------------------------------------------------------------ GPA ------------------
    def on_train_epoch_end(self, epoch: int, max_epochs: int) -> None:
        if not self.config.gpa or epoch >= max_epochs:
            return
        weight = gpa_weights(max_epochs, self.config.gpa_mean, self.config.gpa_std)[epoch]
        with torch.no_grad():
            for name in self._gpa_names:
                getattr(self.gpa, _key(name)).add_(self.get_parameter(name).detach(), alpha=weight)
            self.gpa.total_weight += weight

    def on_fit_end(self) -> None:
        """Replace the prompts by their Gaussian-weighted average over the epochs seen."""
        total = float(self.gpa.total_weight)
        if not self.config.gpa or total <= 0:
            return
        with torch.no_grad():
            for name in self._gpa_names:
                self.get_parameter(name).copy_(getattr(self.gpa, _key(name)) / total)
        self._text_cache = None


def _key(param_name: str) -> str:
    return "sum_" + param_name.replace(".", "_")
