"""LASP (Bulat & Tzimiropoulos, CVPR 2023): CoOp's prompt, regularised by classifying CLIP's own
hand-written prompts with it ("text-to-text"), plus a learned text bias and image LayerNorms.

Learned: M context vectors (CoOp's, shared by the classes, class name last), a class-agnostic
bias w added to every class's text feature before it is normalized (t_c = normalize(f_text(c)
+ w), zero at the start), and the scale and shift of every image-tower block's two LayerNorms
(``ln_1``, ``ln_2``; at 0.1x the prompt's lr: the parameter group ``norms``). Training loss:
CE(s·f·tᵀ, y) + λ·L_tt, where for P hand-written templates h_{p,j} = normalize(f_text(template_p
(class j))) (frozen; with probability 1/2 per step plus 0.05·N(0, 1) noise, not renormalized),
and L_tt = mean_{p,j} CE over the learned prompts i of s·⟨t_i, h_{p,j}⟩ with target i = j: each
hand-written prompt must be recognised by the learned one of its class. Prediction: s·f·tᵀ with
w and the tuned LayerNorms.

Reference: 1adrianb/lasp at 5b1e8d9 (``prompting/lasp.py``, ``prompting/losses.py``;
``configs/LASP/vit_b16_c4_ep25_batch32_cls_t2t_5_wcl_25_g1_b_lr32.yaml``: N_CTX 4 "a photo of a",
λ = 5, the 35 templates below, SGD lr 0.032 cosine, 3 warm-up epochs at 1e-5, batch 32,
25 epochs, amp with the gradient norm clipped to 1).

Departures and decisions, each deliberate:
- Classes in L_tt: the released code builds it over *every* class name of the dataset, novel
  ones included in base-to-novel runs (``all_class_names`` is read before the base split; its
  logs say "Num classes used for LASP: 37" on the 19 base classes of Pets): the paper's LASP-V
  ("virtual classes"). Here ``t2t_classes: train`` (default) uses the training classes only, the
  plain LASP the protocol allows; ``t2t_classes: all`` is the released behaviour.
- With the training classes only, L_tt reuses the text features of the CE's forward (the same
  prompts), where the original encodes them a second time: the same values and gradient.
- w has the joint embedding's size (where it is added); the original sizes it by the text
  width, the same for ViT-B/16 (512) and wrong for RN50.
- The template list keeps the released duplicate ("a bad photo of the {}." twice), which weighs
  that template double in L_tt.
- Precision is adapt's (fp32 on CPU, bf16 / fp16 autocast on GPUs) where the original runs amp;
  its gradient clipping is the recipe's ``trainer.gradient_clip_val: 1.0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import MethodOutput, ParamGroup, as_output, check_templates, text_feature_mean
from adapt.data.items import clean_classname
from adapt.methods.coop import CoOp, CoOpConfig
from adapt.methods.registry import register_method

# TRAINER.LASP.LASP_PROMPTS of every released config, in order
LASP_TEMPLATES = [
    "a photo of a {}, a type of flower.", "a photo of a person doing {}.", "a centered satellite photo of {}.",
    "a photo of a {}, a type of aircraft.", "{} texture.", "itap of a {}.", "a bad photo of the {}.",
    "a origami {}.", "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
    "a photo of the small {}.", "a photo of a {}.", "a photo of many {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a pixelated photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a close-up photo of the {}.", "a low resolution photo of a {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
]
NORMS = (".ln_1.", ".ln_2.")  # each image block's two LayerNorms (FINETUNE_VIT_LN)


@dataclass
class LASPConfig(CoOpConfig):
    n_ctx: Optional[int] = None
    ctx_init: str = "a photo of a"  # TRAINER.LASP.CTX_INIT (M = 4)
    weight: float = 5.0             # λ, LASP_LOSS_WEIGHT (10 for Caltech101, DTD, UCF101)
    templates_t2t: list[str] = field(default_factory=lambda: list(LASP_TEMPLATES))
    noise_std: float = 0.05
    noise_prob: float = 0.5
    t2t_classes: str = "train"      # train | all (the released code: every class name of the dataset)
    correction: bool = True         # ENABLE_CORRECTION: the learned text bias w
    DEFAULT_N_CTX: ClassVar[int] = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.csc or self.class_token_position != "end":
            raise ValueError("lasp learns one context for all classes with the class name last "
                             "(method.csc=false, method.class_token_position=end)")
        if self.weight < 0 or self.noise_std < 0 or not 0 <= self.noise_prob <= 1:
            raise ValueError(f"lasp: weight and noise_std must be >= 0 and noise_prob in [0, 1], got "
                             f"{self.weight}, {self.noise_std}, {self.noise_prob}")
        if self.t2t_classes not in ("train", "all"):
            raise ValueError(f"t2t_classes must be 'train' or 'all', got {self.t2t_classes!r}")
        if not self.templates_t2t:
            raise ValueError("templates_t2t needs at least one hand-written template")
        check_templates(self.templates_t2t, "templates_t2t")


@register_method("lasp")
class LASP(CoOp):
    Config = LASPConfig
    trainable_kind = "text context, text bias, image LayerNorms"
    changes_backbone = True  # the image tower's LayerNorms train (on the method's own clone)
    supports_feature_cache = False

    def __init__(self, config: LASPConfig, backbone, classnames, templates):
        self.extra_classnames: list[str] = []  # L_tt's classes beyond the training ones
        super().__init__(config, backbone, classnames, templates)
        self.bias = nn.Parameter(torch.zeros(self.backbone.embed_dim)) if config.correction else None
        self._norms = [n for n, p in self.backbone.named_parameters()
                       if self.backbone.tower_of(n.removeprefix("model.")) == "image" and any(k in n for k in NORMS)]
        params = dict(self.backbone.named_parameters())
        for n in self._norms:
            params[n].requires_grad_(True)

    def setup(self, datamodule) -> None:
        """``t2t_classes: all``: the dataset's other class names join L_tt (the released code)."""
        if self.config.t2t_classes == "all" and datamodule.dataset is not None:
            own = set(self.classnames)
            self.extra_classnames = [c for c in map(clean_classname, datamodule.dataset.classnames) if c not in own]
            self.rebuild_classes()

    def set_classnames(self, classnames: Sequence[str], tasks: Optional[Sequence[str]] = None) -> None:
        self.extra_classnames = []  # re-pointed (novel classes, an adapter): L_tt is for training only
        super().set_classnames(classnames, tasks)

    def rebuild_classes(self) -> None:
        self.prompts.build(self.classnames + self.extra_classnames)
        self.register_buffer("t2t_features", None, persistent=False)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self._norms}

    def param_groups(self) -> dict[str, ParamGroup]:
        params = dict(self.backbone.named_parameters())
        own = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        return {"prompt": ParamGroup(own), "norms": ParamGroup([params[n] for n in self._norms], lr_scale=0.1)}

    # ------------------------------------------------------------------ forward ----------------
    def all_text_features(self) -> torch.Tensor:
        """t [C (+ extra), d]: the learned prompts' features plus w, normalized."""
        text = self.prompts.text_features(normalize=False)
        if self.bias is not None:
            text = text + self.bias.to(text.dtype)
        return F.normalize(text, dim=-1)

    def text_features(self) -> torch.Tensor:
        return self.cached_text_features(lambda: self.all_text_features()[:len(self.classnames)])

    def output(self, x: torch.Tensor) -> MethodOutput:
        text = self.all_text_features()
        logits = self.backbone.logits(self.image_features_of(x), text[:len(self.classnames)])
        return MethodOutput(logits, {"text_features": text})

    # ------------------------------------------------------------------ loss -------------------
    def references(self) -> torch.Tensor:
        """h [P, C (+ extra), d]: each template's normalized frozen feature of each class."""
        if self.t2t_features is None:
            names = self.classnames + self.extra_classnames
            h = torch.stack([text_feature_mean(self.backbone, names, [t]) for t in self.config.templates_t2t])
            self.register_buffer("t2t_features", h, persistent=False)
        return self.t2t_features

    def text_to_text_loss(self, text: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h = self.references().to(text)
        if torch.rand(1).item() < cfg.noise_prob:  # the original's order of draws: a coin, then the noise
            h = h + cfg.noise_std * torch.randn_like(h)
        logits = self.backbone.logit_scale * torch.einsum("id,pjd->pij", text, h)  # [P, learned i, template j]
        target = torch.arange(text.shape[0], device=text.device).expand(h.shape[0], -1)
        return F.cross_entropy(logits, target)

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        ce = F.cross_entropy(out.logits, labels)
        if self.config.weight == 0:
            return ce
        text = out.tensors.get("text_features")
        tt = self.text_to_text_loss(self.all_text_features() if text is None else text)
        out.scalars.update(ce=ce.detach(), t2t=tt.detach())
        return ce + self.config.weight * tt
