"""CALIP (Guo et al., AAAI 2023): zero-shot CLIP plus a parameter-free attention between the
image's patch tokens and the class text features. Nothing is trained.

With ``f`` the pooled image feature, ``F_s`` [HW, d] the patch tokens (the last block's tokens
through ``ln_post`` and the projection on a ViT, the attention pool with every position as its
query on a ResNet: the original's ``encode_image`` returns both, ``adapt/dense.py`` gives them),
all L2-normalised, and ``F_t`` [K, d] the template-ensembled zero-shot classifier::

    A    = 2 · F_s F_tᵀ                                  [HW, K]
    F_ta = softmax_HW(A)ᵀ F_s                            visual-guided text, not renormalised
    F_sa = softmax_K(A) F_t;  v = mean_HW(F_sa) + max_HW(F_sa)   text-guided visual
    logits = s·f·F_tᵀ + β2 · s·f·F_taᵀ + β3 · s·v·F_tᵀ   (β1 = 1)

as ``run_imagenet.py:get_logits`` of ZiyuGuo99/CALIP@83e21b6 computes it (s = 100 there; the
7 ImageNet templates ensembled as ``utils.text_encode``). At β2 = β3 = 0 it is zero-shot CLIP.

Departures from the original, deliberate:

* β2 and β3 are grid-searched on the **validation** split (the original searches them on the
  test labels it reports). The grid is the original's: β = 0.001 + i(β_max − 0.001)/200,
  i < 200, β2 in the outer loop, the first best kept; β2_max = 2, β3_max = 0.1 (its ImageNet
  config). Without validation images the config's β2 / β3 are used: their defaults, 1.0 and
  0.05 (the middle of the original's search ranges), are our choice; the original publishes no
  fixed values.
* The original runs a batch of one image at a time; here the same products run batched
  (identical up to round-off).
* ``logit_scale`` is the original's hard-coded 100; null uses the backbone's own scale (and
  bias), which is 100 for OpenAI's CLIP.
* The parametric CALIP-FS of the paper was never released (the original's issues #3 / #6);
  it is not offered.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from adapt.methods.base import HandWrittenClassifier, check_templates, items_of_classes
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@dataclass
class CalipConfig:
    # weights of the visual-guided text term (β2) and the text-guided visual term (β3); used
    # as they are when there is no validation split or search is false
    beta2: float = 1.0
    beta3: float = 0.05
    # grid search of β2 / β3 on the validation split (never on test), over the original's grid
    search: bool = True
    beta2_max: float = 2.0
    beta3_max: float = 0.1
    steps: int = 200
    # the softmax sharpness of the attention (the original's constant 2)
    attention_scale: float = 2.0
    # multiplier of all three logit terms: the original's 100; null = the backbone's own scale
    logit_scale: Optional[float] = 100.0
    # zero-shot classifier from all of the dataset's templates (the original ensembles 7 on
    # ImageNet) or only the first
    ensemble: bool = True
    templates: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_templates(self.templates)
        if self.beta2 < 0 or self.beta3 < 0:
            raise ValueError(f"beta2 and beta3 must be >= 0, got {self.beta2}, {self.beta3}")
        if self.search and (self.beta2_max <= 0.001 or self.beta3_max <= 0.001 or self.steps < 1):
            raise ValueError("beta2_max and beta3_max must be > 0.001 (the grids start there) and steps >= 1")
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0 (or null for the model's), got {self.logit_scale}")


def search_grid(maximum: float, steps: int) -> list[float]:
    return [i * (maximum - 0.001) / steps + 0.001 for i in range(steps)]


@register_method("calip")
class Calip(HandWrittenClassifier):
    Config = CalipConfig
    trainable_kind = "nothing"
    supports_feature_cache = True
    dense_inputs = ("pooled", "tokens")
    couples_classes = True  # the text-guided visual term takes a softmax over the classes

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.register_buffer("beta2", torch.tensor(float(config.beta2)))
        self.register_buffer("beta3", torch.tensor(float(config.beta3)))
        self.search_result: Optional[dict] = None
        self.rebuild_classes()

    # ------------------------------------------------------------------ logits -----------------
    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three logit terms [B, K] of images or cached dense features: zero-shot, the
        visual-guided text one and the text-guided visual one (each with the scale s)."""
        dense = self.dense_features_of(x)
        f, fs = dense.pooled, dense.tokens
        ft = self.text_features.to(f.dtype)
        attn = self.config.attention_scale * fs @ ft.t()  # [B, HW, K]
        ft_a = torch.einsum("bjc,bjk->bkc", fs, F.softmax(attn, dim=1))
        fs_a = F.softmax(attn, dim=2) @ ft  # [B, HW, d]
        v = fs_a.mean(1) + fs_a.max(1).values
        scale = self.config.logit_scale
        if scale is None:
            zs = self.backbone.logits(f, self.text_features)
            scale = self.backbone.logit_scale
        else:
            zs = scale * f @ ft.t()
        return zs, scale * torch.einsum("bc,bkc->bk", f, ft_a), scale * v @ ft.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs, text_term, visual_term = self.terms(x)
        return zs + self.beta2 * text_term + self.beta3 * visual_term

    # ------------------------------------------------------------------ β search ---------------
    def setup(self, datamodule) -> None:
        """Search β2 / β3 on the validation images of this method's classes (if any)."""
        cfg, dm = self.config, datamodule
        with torch.no_grad():
            self.beta2.fill_(cfg.beta2)
            self.beta3.fill_(cfg.beta3)
        self.search_result = None
        val = items_of_classes(dm.val_items, dm.train_classnames, self.classnames) if cfg.search else []
        if not val:
            if cfg.search:
                log.info("calip: no validation images; keeping beta2=%g, beta3=%g", cfg.beta2, cfg.beta3)
            return
        cached = dm.encode(self.backbone, val, dm.test_transform(), "val", normalize=False,
                           dense=self.dense_inputs)
        device = self.text_features.device
        with torch.no_grad():
            terms = [t.float() for t in self.terms(cached.features[0].float().to(device))]
        self.search(*terms, cached.labels.to(device))

    def search(self, zs: torch.Tensor, text_term: torch.Tensor, visual_term: torch.Tensor,
               labels: torch.Tensor) -> dict:
        """The original's grid over (β2, β3), first best kept; sets and returns the choice."""
        cfg = self.config
        b3 = torch.tensor(search_grid(cfg.beta3_max, cfg.steps), device=zs.device)
        best = (-1, float(self.beta2), float(self.beta3))
        with torch.no_grad():
            before = int((zs + self.beta2 * text_term + self.beta3 * visual_term).argmax(-1).eq(labels).sum())
            chunk = max(1, 2 ** 24 // max(1, zs.numel()))  # bounds the [β3, N, K] block
            for beta2 in search_grid(cfg.beta2_max, cfg.steps):
                base = zs + beta2 * text_term
                correct = torch.cat([((base + b[:, None, None] * visual_term).argmax(-1) == labels).sum(-1)
                                     for b in b3.split(chunk)])
                i = int((correct == correct.max()).nonzero()[0])  # the first best β3
                if int(correct[i]) > best[0]:
                    best = (int(correct[i]), beta2, float(b3[i]))
            self.beta2.fill_(best[1])
            self.beta3.fill_(best[2])
        n = len(labels)
        self.search_result = {"beta2": best[1], "beta3": best[2], "val_acc": 100.0 * best[0] / n,
                              "val_acc_before": 100.0 * before / n, "val_images": n}
        log.info("calip: beta2=%.4g beta3=%.4g chosen on %d validation images (acc %.2f%%, %.2f%% "
                 "with the config's)", best[1], best[2], n, 100.0 * best[0] / n, 100.0 * before / n)
        return self.search_result

    def scalars(self) -> dict[str, float]:
        out = {"beta2": float(self.beta2), "beta3": float(self.beta3)}
        if self.search_result is not None:
            out.update(val_acc=self.search_result["val_acc"], val_acc_before=self.search_result["val_acc_before"])
        return out
