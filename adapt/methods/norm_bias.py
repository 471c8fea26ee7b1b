"""The cheap backbone baselines: LayerNorm tuning (through peft) and BitFit (biases only).

Both change a small set of the backbone's own tensors in both towers and classify with CLIP's
hand-written prompts, like LoRA (``adapt.methods.weight_space``):

* ``lntuning``: every LayerNorm of the chosen towers (each block's two, ``ln_pre`` / ``ln_post``
  of the image tower, ``ln_final`` of the text tower) gets a trainable copy of its scale and
  shift, injected by peft (``LNTuningConfig``); the frozen originals stay as they were.
* ``bitfit``: every bias of the chosen towers trains (attention projections, MLP, LayerNorm
  shifts; Ben Zaken et al., ACL 2022). peft has no BitFit, so this is the one hand-written
  choice: which tensors to unfreeze.

Neither has a CLIP paper setting; their recipes use CLIP-LoRA's optimisation (AdamW, cosine per
iteration, 500 × shots iterations at batch 32), as the few-shot PEFT comparisons that list them
do, with the model's own logit scale. Both equal zero-shot CLIP before training.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from adapt.methods.base import check_templates
from adapt.methods.registry import register_method
from adapt.methods.weight_space import BackboneTuning, check_towers


@dataclass
class NormBiasConfig:
    towers: list[str] = field(default_factory=lambda: ["image", "text"])
    logit_scale: Optional[float] = None  # null = the model's
    templates: Optional[list[str]] = None  # default: the dataset's first template
    ensemble: bool = False

    def __post_init__(self) -> None:
        check_towers(self.towers)
        check_templates(self.templates)


@dataclass
class LNTuningConfig(NormBiasConfig):
    pass


@dataclass
class BitFitConfig(NormBiasConfig):
    pass


@register_method("lntuning")
class LNTuning(BackboneTuning):
    """LayerNorm tuning: a trainable copy of every LayerNorm's scale and shift in both towers (peft)."""

    Config = LNTuningConfig
    trainable_kind = "LayerNorm scales and shifts"

    def change_backbone(self) -> list[str]:
        from peft import LNTuningConfig as PeftLNTuning, inject_adapter_in_model

        model = self.backbone.model
        names = [n for n, m in model.named_modules()
                 if isinstance(m, nn.LayerNorm) and self.backbone.tower_of(n) in self.config.towers]
        with warnings.catch_warnings():  # open_clip's LayerNorm is a subclass peft does not list
            warnings.filterwarnings("ignore", "Unsupported layer type")
            inject_adapter_in_model(PeftLNTuning(target_modules=names), model)
        return [n for n, _ in self.backbone.named_parameters() if ".ln_tuning_layers." in n]


@register_method("bitfit")
class BitFit(BackboneTuning):
    """BitFit (Ben Zaken et al., ACL 2022): only the biases of both towers train."""

    Config = BitFitConfig
    trainable_kind = "biases"

    def change_backbone(self) -> list[str]:
        names = [n for n, p in self.backbone.model.named_parameters()
                 if _is_bias(n) and self.backbone.tower_of(n) in self.config.towers]
        params = dict(self.backbone.model.named_parameters())
        for n in names:
            params[n].requires_grad_(True)
        return ["model." + n for n in names]


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")  # nn.MultiheadAttention's in_proj_bias
