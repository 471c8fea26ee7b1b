"""PLOT++ (Chen et al., "PLOT: Prompt Learning with Optimal Transport for Vision-Language Models",
ICLR 2023; the ViT variant of CHENGY12/PLOT@728539f, ``plot-pp/trainers/plotpp.py``).

A class is described by N text prompts and an image by M views, and the score of (image, class)
is the optimal-transport alignment of the two sets: the cosine ``sim[m, n]`` of view m's feature
with prompt n's class feature, weighted by the transport plan ``T`` between uniform marginals
(1/M, 1/N) under cost ``1 − sim``, found by Sinkhorn iterations with entropic regulariser ε:

    K = exp(−(1 − sim)/ε),  r ← u / (K c),  c ← v / (Kᵀ r)   (≤ ``max_iter``, stop when the
    batch-mean |Δr| < ``tol``),  T = diag(r) K diag(c)  (no gradient through T),
    logit(image, class) = s · Σ_mn T_mn sim_mn  [+ s · cos(mean_m f_m, mean_n t_n) with trade_off]

with s = exp(logit_scale). On ViT the M views are not patch tokens (the authors found the OT needs
discriminative local features, which ViT patch tokens are not, issue #1): each view is one pass
of the image with its own ``n_visual_tokens`` learnable tokens appended after the patch tokens
before ``ln_pre`` (shallow visual prompts, N(0, 0.02)), pooled at CLS. The N text prompts are
CoOp contexts, each initialised from one hand-written prefix (``ctx_inits``).

The original trains in two stages, both kept here as the ``stage`` option and chained by the
recipes (``recipes/plot/``):

1. ``stage: vision`` — only the visual prompts train, and the logits add the global term
   (``TRADE_OFF True``, ``MODEL_UPD vision``; seed 1 only in ``scripts/main_visiononly.sh``);
2. ``stage: joint`` — starts from stage 1's adapter (``init_from``, the original's
   ``PRETRAIN_DIR``), trains both prompt sets, OT logits only (``TRADE_OFF False``).

Defaults are ``configs/trainers/PLOTPP/vit.yaml`` and the scripts: M = 4, N = 4, 2 visual tokens,
SGD lr 0.002, batch 32, 50 epochs per stage, cosine with a constant 1e-5 warm-up epoch.

Deliberate departures (each measured or argued, none changes a default figure of the method):

* Each text prompt's context has its own prefix's token count. The original takes the first
  prefix's *word* count for all N prompts and slices every prompt at that length, so a shorter
  prefix (ImageNet's "this is a") makes the first class-name token learnable and drops it from
  the fixed suffix; for the 4-word prefixes of most datasets (the default here) both agree.
* The original picks its 4 prefixes per dataset from a table inside the trainer
  (``template_dict``); here they are the config's ``ctx_inits`` (default: its Caltech101 / SUN397
  list) and a recipe sets a dataset's own.
* Sinkhorn runs in float32 whatever the training precision: exp(−20) underflows in fp16 and the
  plan turns to NaN (the original returns ``None`` for a NaN plan, which then crashes its loss;
  here a NaN reaches the engine's divergence check, which names the step).
* The M views go through the image tower as one batch of M·B images (the original also does, by
  expanding the embedded sequence); its ``amp`` branch, which back-propagates the logits, is not
  reproduced (mixed precision is Lightning's).
* The ImageNet-only device juggling is not reproduced; DDP is Lightning's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.adapters import adapter_folder, read_adapter_meta, read_adapter_state
from adapt.methods.base import Method
from adapt.methods.deep_prompts import layer_tokens
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)
STAGES = ("vision", "joint")


@dataclass
class PLOTConfig:
    # M: visual prompt sets, one image pass each (TRAINER.PLOTPP.M, scripts' argument; 4 in the paper)
    n_visual: int = 4
    # tokens per visual prompt set (N_CTX_V 2)
    n_visual_tokens: int = 2
    # one text prompt per prefix: N = len(ctx_inits) (N 4; template_dict's Caltech101 / SUN397 list)
    ctx_inits: list[str] = field(default_factory=lambda: [
        "a photo of a", "this is a photo", "this is picture of", "one picture of a"])
    # vision: only the visual prompts train; joint: both (MODEL_UPD)
    stage: str = "joint"
    # add the pooled global logits to the OT logits; null = the stage's (vision: true, joint: false)
    trade_off: Optional[bool] = None
    # the stage-1 adapter (a run directory or adapter folder) a joint stage starts from
    init_from: Optional[str] = None
    eps: float = 0.1      # Sinkhorn's entropic regulariser (self.eps)
    max_iter: int = 100   # Sinkhorn iterations at most (self.max_iter)
    tol: float = 1e-2     # stop when the batch-mean |r − r_prev| falls below it (thresh)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"method.stage={self.stage!r}; expected one of {STAGES}")
        if self.n_visual < 1 or self.n_visual_tokens < 1:
            raise ValueError("n_visual and n_visual_tokens must be >= 1")
        if not self.ctx_inits or not all(str(t).strip() for t in self.ctx_inits):
            raise ValueError("ctx_inits must list at least one non-empty prompt prefix, e.g. ['a photo of a']")
        if self.eps <= 0 or self.max_iter < 1 or self.tol < 0:
            raise ValueError("eps must be > 0, max_iter >= 1 and tol >= 0")
        if self.init_from and self.stage != "joint":
            raise ValueError("method.init_from starts the joint stage from a vision-stage adapter; "
                             "set method.stage=joint")

    @property
    def uses_trade_off(self) -> bool:
        return self.stage == "vision" if self.trade_off is None else bool(self.trade_off)


@torch.no_grad()
def sinkhorn(K: torch.Tensor, max_iter: int = 100, tol: float = 1e-2) -> torch.Tensor:
    """The transport plan [R, M, N] of kernels ``K`` [R, M, N] between uniform marginals 1/M and
    1/N, as the original's ``Sinkhorn``: alternate scalings from ones, stop once the mean over
    *all* R rows of |r − r_prev| is below ``tol`` (so the stop depends on the batch), T = r K c."""
    R, M, N = K.shape
    u = K.new_full((R, M), 1.0 / M)
    v = K.new_full((R, N), 1.0 / N)
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.bmm(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.bmm(K.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < tol:
            break
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


@register_method("plot")
class PLOT(Method):
    Config = PLOTConfig
    trainable_kind = "text prompt sets + visual prompt sets (optimal transport)"
    # Sinkhorn stops on a mean over every (image, class) row, so the class list (and the batch)
    # moves the iteration count and with it each class's plan, as in the original
    couples_classes = True

    def __init__(self, config: PLOTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.prompts = nn.ModuleList([ContextPrompts(backbone, 0, text, init_std=config.init_std)
                                      for text in config.ctx_inits])
        tokens = layer_tokens(backbone, config.n_visual, config.n_visual_tokens, backbone.vision_width,
                              config.init_std)
        self.visual = nn.Parameter(torch.stack(list(tokens)))  # [M, n, W]
        if config.stage == "vision":
            for p in self.prompts:
                p.ctx.requires_grad_(False)
        self.rebuild_classes()
        if config.init_from:
            self._start_from(config.init_from)

    def setup(self, datamodule) -> None:
        # here, before training, not at construction: a loaded joint-stage adapter has no init_from
        if self.config.stage == "joint" and not self.config.init_from:
            log.warning("plot: the joint stage starts from fresh visual prompts (no method.init_from); "
                        "the original starts it from a stage-1 run (recipes/plot/vision.yaml)")

    def _start_from(self, path: str) -> None:
        """Take the stage-1 adapter's tensors (its visual prompts; its text contexts when it
        has them) as this stage's starting point."""
        adapter = adapter_folder(path)
        meta = read_adapter_meta(adapter)
        if meta["method"] != "plot":
            raise ValueError(f"method.init_from={path} is a {meta['method']} adapter; the joint stage "
                             "starts from a plot adapter of stage vision")
        state = read_adapter_state(adapter, meta)
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if name not in own or own[name].shape != value.shape:
                    raise ValueError(f"method.init_from={path}: its {name} {tuple(value.shape)} does not fit "
                                     "this plot (same n_visual, n_visual_tokens and ctx_inits as stage 1?)")
                own[name].copy_(value.to(own[name].dtype))

    def rebuild_classes(self) -> None:
        for p in self.prompts:
            p.build(self.classnames)

    def text_features(self) -> torch.Tensor:
        """Unnormalized class features of every prompt set [N, C, d]."""
        return self.cached_text_features(
            lambda: torch.stack([p.text_features(normalize=False) for p in self.prompts]))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalized CLS features of the M prompted passes [M, B, d], as one batch of M·B."""
        b, m = images.shape[0], self.visual.shape[0]
        x = images.repeat(m, 1, 1, 1)                      # row m·B + i: image i with prompt set m
        prompts = self.visual.repeat_interleave(b, dim=0)  # [M·B, n, W]
        return self.backbone.encode_image(x, prompts=prompts, normalize=False).view(m, b, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        img, txt = self.image_features(images), self.text_features()
        f, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        sim = torch.einsum("mbd,ncd->bcmn", f, t)  # [B, C, M, N]
        b, c, m, n = sim.shape
        plan = sinkhorn(torch.exp(-(1.0 - sim.detach().float()) / self.config.eps).reshape(b * c, m, n),
                        self.config.max_iter, self.config.tol).view(b, c, m, n)
        scale = self.backbone.logit_scale  # exp(t), CLIP's temperature
        logits = scale * (plan.to(sim.dtype) * sim).sum(dim=(-2, -1))
        if self.config.uses_trade_off:
            pooled = F.normalize(img.mean(0), dim=-1) @ F.normalize(txt.mean(0), dim=-1).t()
            logits = logits + scale * pooled
        if self.backbone.logit_bias is not None:  # SigLIP towers: their bias, once
            logits = logits + self.backbone.logit_bias
        return logits
