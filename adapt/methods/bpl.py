"""Bayesian prompt learning (Derakhshani et al., ICCV 2023): CoOp's context shifted by a learned
Gaussian, trained and evaluated on Monte-Carlo samples of it.

The context ctx [M, D] plus a shift r ~ N(μ, diag(exp(v))) added to every one of its tokens.
``variant: global`` (the released scripts' ``coopvpt``): μ, v ∈ R^D learned, μ = 0 and v ~ U[0, 1)
at the start (v is the log-variance, named ``std_posterior`` in the original).
``variant: conditional`` (``cocoopvpt``): μ(f) and v(f) of the normalized image feature, each an
MLP d → d/2 → d/2 → D with ELU, so every image has its own posterior. A step draws L shifts r_l = μ + ε_l · exp(v / 2), encodes the
L prompt sets (their shared prefixes once per sample), and minimises
−mean_b log((1/L) Σ_l softmax(z_l)_{y_b}) + 0.001 · mean_d KL(N(μ_d, e^{v_d}) ‖ N(0, 1)), with
z_l = s·f·t_lᵀ. Evaluation scores log((1/L) Σ_l softmax(z_l)) over ``eval_samples`` shifts.

Reference: saic-fi/Bayesian-Prompt-Learning at 8a73fff (``trainers/vpt.py``, ``VPT_TYPE
coopvpt``; ``configs/trainers/VPT/vit_b16_c4_ep10_batch1_ctxv1.yaml``: N_CTX 4 "a photo of a",
L 10, batch 1, SGD lr 0.002, cosine, 1 warm-up epoch at 1e-5; L and epochs per dataset in its
``VPT.md``). The loss and gradients are checked against ``CustomCLIP`` in ``tests/test_bpl.py``
when a checkout is at hand.

Departures, each deliberate:
- Evaluation samples: the original draws fresh shifts for every test batch (batch 1: every
  image), so its accuracy changes from run to run. Here one set of ``eval_samples`` shifts is
  drawn per evaluation from a generator seeded with ``eval_seed``: every image is scored by the
  same L prompts, whatever the batch size, order or number of processes, and a rerun gives the
  same figures. ``eval_samples: 0`` scores at the posterior mean (ctx + μ) instead.
- Training draws its shifts from the global generator (the run's seed; checkpoints keep its
  state), in the original's order and shape, so a step draws the same values.
- The conditional variant works at any batch size: the original adds a [L, B, D] shift to the
  [1, M, D] context, which broadcasts right only at batch 1 (its configs' batch) and is silently
  wrong at B = M; here image b's L contexts get its own shifts, and its KL term (one per image
  there) is averaged over the batch.
- Its evaluation shifts are μ(f) + ε_l · exp(v(f) / 2) with one seeded ε [L, D] per evaluation,
  so each image's score does not depend on its batch.
- Precision is adapt's (fp32 on CPU; autocast on GPUs) where the original runs fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import MethodOutput, as_output
from adapt.methods.coop import CoOp, CoOpConfig
from adapt.methods.registry import register_method


@dataclass
class BPLConfig(CoOpConfig):
    n_ctx: Optional[int] = None
    ctx_init: str = "a photo of a"  # TRAINER.VPT.CTX_INIT (M = 4)
    samples: int = 10               # L, TRAINER.VPT.L (per dataset: VPT.md)
    eval_samples: int = 10          # L at evaluation (the original's: the same L); 0 = at the mean
    eval_seed: int = 0              # the generator of the evaluation shifts
    kl_weight: float = 0.001
    variant: str = "global"         # global (coopvpt, the released configs) | conditional (cocoopvpt)
    DEFAULT_N_CTX: ClassVar[int] = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.csc or self.class_token_position != "end":
            raise ValueError("bpl shifts one shared context with the class name last (method.csc=false, "
                             "method.class_token_position=end)")
        if self.variant not in ("global", "conditional"):
            raise ValueError(f"variant must be 'global' or 'conditional', got {self.variant!r}")
        if self.variant == "conditional" and self.eval_samples == 0:
            raise ValueError("eval_samples=0 (at the mean) is for the global variant; the conditional "
                             "one scores each image on its own samples: set eval_samples >= 1")
        if self.samples < 1 or self.eval_samples < 0 or self.kl_weight < 0:
            raise ValueError(f"bpl needs samples >= 1, eval_samples >= 0 and kl_weight >= 0, got "
                             f"{self.samples}, {self.eval_samples}, {self.kl_weight}")


@register_method("bpl")
class BPL(CoOp):
    Config = BPLConfig
    trainable_kind = "text context + its Gaussian shift"
    couples_classes = True  # the score is a mean of softmaxes over the classes

    def __init__(self, config: BPLConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        width = self.prompts.ctx.shape[-1]
        if config.variant == "global":
            self.mean_posterior = nn.Parameter(torch.zeros(width))
            self.logvar_posterior = nn.Parameter(torch.rand(width))  # the original's std_posterior: U[0, 1)
        else:  # the original's Amortized: a mean net, then a log-variance net (its init order)
            vis = backbone.embed_dim
            self.meta_mean, self.meta_logvar = (nn.Sequential(
                nn.Linear(vis, vis // 2), nn.ELU(), nn.Linear(vis // 2, vis // 2), nn.ELU(),
                nn.Linear(vis // 2, width)).to(device=backbone.logit_scale.device) for _ in range(2))

    def posterior(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, v): [D] each (global), or [B, D] each of the images (conditional)."""
        if self.config.variant == "global":
            return self.mean_posterior, self.logvar_posterior
        f = image_features.to(self.prompts.ctx.dtype)
        return self.meta_mean(f), self.meta_logvar(f)

    def shifted_contexts(self, eps: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The context plus μ + ε · exp(v / 2) on every token: [L, M, D] for a global posterior and
        ε [L, D]; [L, B, M, D] for per-image ones ([B, D]) and ε [L, B, D] or [L, 1, D]."""
        shift = mu + eps * logvar.exp().sqrt()
        return self.prompts.ctx + shift.unsqueeze(-2)

    def sample_logits(self, image_features: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """[L, B, C] logits of the L shifted prompt sets (per image for the conditional variant)."""
        mu, logvar = self.posterior(image_features)
        ctx = self.shifted_contexts(eps, mu, logvar)
        scale = self.backbone.logit_scale
        if ctx.dim() == 3:  # global: [L, C, d], shared by the batch
            text = self.prompts.text_features_per_image(ctx)
            return scale * torch.einsum("bd,lcd->lbc", image_features, text.to(image_features.dtype))
        l, b = ctx.shape[:2]
        text = self.prompts.text_features_per_image(ctx.flatten(0, 1)).unflatten(0, (l, b))  # [L, B, C, d]
        return scale * torch.einsum("bd,lbcd->lbc", image_features, text.to(image_features.dtype))

    @staticmethod
    def log_mean_softmax(logits: torch.Tensor) -> torch.Tensor:
        """log((1/L) Σ_l softmax(z_l)) [B, C] of [L, B, C]."""
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])

    def output(self, x: torch.Tensor) -> MethodOutput:
        feats = self.image_features_of(x)
        # the original's draw: (L,) + μ's shape, from the global generator
        shape = (self.config.samples, self.prompts.ctx.shape[-1]) if self.config.variant == "global" else (
            self.config.samples, feats.shape[0], self.prompts.ctx.shape[-1])
        eps = torch.randn(shape, device=feats.device).to(self.prompts.ctx.dtype)
        logits = self.sample_logits(feats, eps)
        return MethodOutput(self.log_mean_softmax(logits), {"sample_logits": logits, "image_features": feats})

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.variant == "conditional":  # each image's own posterior, the evaluation's fixed ε
            return self.log_mean_softmax(self.sample_logits(image_features, self._eval_eps().unsqueeze(1)))
        if cfg.eval_samples == 0:  # at the posterior mean
            text = self.cached_text_features(lambda: self.prompts.text_features(
                self.prompts.ctx + self.mean_posterior))
            return self.backbone.logits(image_features, text)
        text = self.cached_text_features(self._eval_text_features)  # [L, C, d], one draw per evaluation
        logits = self.backbone.logit_scale * torch.einsum("bd,lcd->lbc", image_features,
                                                          text.to(image_features.dtype))
        return self.log_mean_softmax(logits)

    def _eval_eps(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.eval_seed)
        eps = torch.randn(self.config.eval_samples, self.prompts.ctx.shape[-1], generator=g)
        return eps.to(self.prompts.ctx)

    def _eval_text_features(self) -> torch.Tensor:
        return self.prompts.text_features_per_image(
            self.shifted_contexts(self._eval_eps(), self.mean_posterior, self.logvar_posterior))

    def kl(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean_d KL(N(μ_d, e^{v_d}) ‖ N(0, 1)), averaged over the images' posteriors (conditional)."""
        mu, logvar = self.posterior(image_features)
        return 0.5 * (logvar.exp() + mu ** 2 - 1 - logvar).mean()

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        logits = out.tensors.get("sample_logits")
        if logits is None:
            raise ValueError("bpl's loss needs its per-sample logits: pass it what output(x) returns")
        log_p = F.log_softmax(logits, dim=-1).gather(-1, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1))
        nll = -(torch.logsumexp(log_p[..., 0], dim=0) - math.log(logits.shape[0])).mean()
        kl = self.kl(out.tensors.get("image_features"))
        out.scalars.update(nll=nll.detach(), kl=kl.detach())
        return nll + self.config.kl_weight * kl
