"""ProDA (Lu et al., CVPR 2022): a Gaussian over the class text features of K learned prompts.

K context sets ctx_k [M, D] (N(0, 0.02)), the class name after a quarter of them, in the middle
of a quarter and at the end of half (the three positions CoOp knows). A step encodes a subset of
K' of them for every class: t_{c,k} = normalize(f_text(prompt_k(c))), μ_c = mean_k t_{c,k}, and a
diagonal covariance per pair of classes Σ_ij[d] = Σ_k (t_ik − μ_i)_d (t_jk − μ_j)_d / (K' + 1).
Training minimises the surrogate (an upper bound of the expected CE over the Gaussian):
CE(z, y) with z_c = s·f·μ_c + (s² / 2)·Σ_d f_d² (Σ_yy[d] + Σ_cc[d] − 2 Σ_yc[d]) (zero for the
true class, ≥ 0 for the others), plus λ_div · mean_{k≠k'} |cos(g_k, g_k')| over the class-free
prompts "ctx_k ." (their diversity). Prediction: s·f·μ_cᵀ over all K prompts (μ not renormalised).

Reference: the official code was never released (bbbdylan/proda at bf8d52b holds a README that
points to an unreachable zip). Written from the paper's formulation and the reimplementations
that agree on the formulas above (LAMDASZ-ML/BMIPRS ``trainers/proda.py`` at d4a3054, and another
library's ``ProDAPromptLearner``); the choices where they differ or say nothing:
- K = 32 prompts of M = 16 vectors, split front / middle / end as K/4, K/4, K/2 (both);
- ``prompt_batch`` K' = K: every prompt every step (one reimplementation samples a subset of
  ``prompt_batch_size``, BMIPRS one of the data batch's size); a smaller K' draws a random subset
  per step from the run's generator (seeded, resumable);
- the covariance divides by K' + 1, as both reimplementations do;
- the diversity term is in the loss at weight 1 (one reimplementation; BMIPRS computes it and
  drops it): ``diversity_weight: 0`` removes it;
- the test-time classifier is the plain mean, not renormalised (both);
- optimisation: CoOp's (both), in the recipe.

Departures: none from an original, as none was released; the choices above are where the paper
and the reimplementations leave room, and each is a Config field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import Method, MethodOutput, as_output
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method


@dataclass
class ProDAConfig:
    n_prompts: int = 32         # K
    n_ctx: int = 16             # M per prompt
    init_std: float = 0.02
    prompt_batch: Optional[int] = None  # K' per step; null = all K
    diversity_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.n_prompts < 4 or self.n_prompts % 4:
            raise ValueError(f"n_prompts must be a multiple of 4 (a quarter front, a quarter middle, half "
                             f"end), got {self.n_prompts}")
        if self.n_ctx < 2:
            raise ValueError(f"n_ctx must be >= 2 (the middle position splits it), got {self.n_ctx}")
        if self.prompt_batch is not None and not 2 <= self.prompt_batch <= self.n_prompts:
            raise ValueError(f"prompt_batch must be in [2, n_prompts={self.n_prompts}] (a covariance needs "
                             f"two prompts), got {self.prompt_batch}")
        if self.diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0, got {self.diversity_weight}")


@register_method("proda")
class ProDA(Method):
    Config = ProDAConfig
    trainable_kind = "text contexts (K prompts)"
    supports_feature_cache = True

    def __init__(self, config: ProDAConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        k, m = config.n_prompts, config.n_ctx
        self.ctx = nn.Parameter(torch.empty(k, m, backbone.text_width, dtype=backbone.dtype).normal_(
            std=config.init_std))
        # which prompt sits where: the first quarter front, the next middle, the second half end
        self.positions = ["front"] * (k // 4) + ["middle"] * (k // 4) + ["end"] * (k // 2)
        # the frozen token pieces of each layout (their own context vectors are never used)
        self.views = nn.ModuleDict({p: ContextPrompts(backbone, m, position=p) for p in ("front", "middle", "end")})
        self.free = ContextPrompts(backbone, m)  # "ctx_k ." without a class name, for the diversity
        for view in (*self.views.values(), self.free):
            del view.ctx
        self.free.build([""])
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        for view in self.views.values():
            view.build(self.classnames)

    def prompt_features(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """t [K', C, d]: each chosen prompt's normalized class features (all K by default), in
        ``index`` order."""
        index = torch.arange(self.ctx.shape[0], device=self.ctx.device) if index is None else index
        parts, order = [], []
        for name, view in self.views.items():
            mine = [i for i, k in enumerate(index.tolist()) if self.positions[k] == name]
            if mine:
                parts.append(view.text_features_per_image(self.ctx[index[mine]]))
                order += mine
        feats = torch.cat(parts)
        return feats[torch.argsort(torch.tensor(order, device=feats.device))]

    def text_features(self) -> torch.Tensor:
        """The classifier: μ_c [C, d], the mean over all K prompts (not renormalised)."""
        return self.cached_text_features(lambda: self.prompt_features().mean(0))

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features())

    def output(self, x: torch.Tensor) -> MethodOutput:
        feats = self.image_features_of(x)
        k = self.ctx.shape[0]
        chosen = self.config.prompt_batch or k
        index = torch.arange(k) if chosen == k else torch.randperm(k)[:chosen]
        t = self.prompt_features(index.to(self.ctx.device))  # [K', C, d]
        mu = t.mean(0)
        return MethodOutput(self.backbone.logits(feats, mu),
                            {"image_features": feats, "prompt_features": t, "index": index})

    def surrogate_logits(self, feats: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z [B, C]: s·f·μ_c + (s² / 2) Σ_d f_d² (Σ_yy + Σ_cc − 2 Σ_yc)[d]."""
        s = self.backbone.logit_scale
        mu = t.mean(0)
        dev = t - mu  # [K', C, d]
        n = t.shape[0] + 1  # the reimplementations' divisor, K' + 1
        dev_y = dev[:, labels]  # [K', B, d]
        f2 = feats.to(t.dtype) ** 2
        var_y = (f2 * (dev_y ** 2).sum(0)).sum(-1, keepdim=True) / n  # Σ_d f² Σ_yy: [B, 1]
        var_c = f2 @ (dev ** 2).sum(0).t() / n  # Σ_d f² Σ_cc: [B, C]
        cov = torch.einsum("bd,kbd,kcd->bc", f2, dev_y, dev) / n  # Σ_d f² Σ_yc: [B, C]
        return s * feats.to(t.dtype) @ mu.t() + 0.5 * s ** 2 * (var_y + var_c - 2 * cov)

    def diversity(self, index: torch.Tensor) -> torch.Tensor:
        """mean over pairs k ≠ k' of |cos(g_k, g_k')| of the class-free prompts' features."""
        g = self.free.text_features_per_image(self.ctx[index.to(self.ctx.device)])[:, 0]  # [K', d], normalized
        cos = (g @ g.t()).abs()
        k = g.shape[0]
        return (cos.sum() - cos.diagonal().sum()) / (k * (k - 1))

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        if "prompt_features" not in out.tensors:
            raise ValueError("proda's loss needs the prompts' features: pass it what output(x) returns")
        z = self.surrogate_logits(out.tensors["image_features"], out.tensors["prompt_features"], labels)
        ce = F.cross_entropy(z, labels)
        out.scalars.update(ce=ce.detach())
        if not self.config.diversity_weight:
            return ce
        div = self.diversity(out.tensors["index"])
        out.scalars.update(diversity=div.detach())
        return ce + self.config.diversity_weight * div
