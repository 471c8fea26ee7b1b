"""DualCoOp (Sun, Hu and Saenko, NeurIPS 2022): multi-label recognition with a positive and a
negative learned context per class list, aggregated over the image's spatial tokens.

Two CoOp contexts give each class k a positive and a negative text feature, ``t_k⁺`` and
``t_k⁻`` (prompts ``[SOS] ctx± <class name> . [EOS]``, frozen CLIP). With ``z_j`` the image's
L2-normalised tokens (the spatial tokens and a global one, see below)::

    s_kj± = 20 · z_j · t̂_k±                      (j over the tokens)
    w_kj  = softmax_j(s_kj⁺)                      the positive map weighs both branches
    l_k±  = 5 · Σ_j w_kj s_kj±
    p_k   = softmax(l_k⁻, l_k⁺)[+] = σ(l_k⁺ − l_k⁻)

as ``models/dualcoop.py:DualCoop.forward`` of sunxm2357/DualCoOp@49e71d7 computes it (its
"class-specific region feature aggregation"). The loss is its asymmetric loss over the entries
that are not unknown (γ− = 2, γ+ = 1, clip 0.05, a sum, times ``loss_w``:
``utils/asymmetric_loss.py``, ``utils/trainers.py``); partial labels come from the data
(``data.partial_labels``: each entry kept with probability p, as its ``partial_portion``).
Defaults are its configs': 16 + 16 random N(0, 0.02) context vectors shared by the classes
(``--csc`` for class-specific ones, which its README advises for partial labels), and in the
recipe SGD lr 0.002 (COCO; VOC 0.001), momentum 0.9, wd 5e-4, cosine over 50 epochs after one
warm-up epoch at a constant 1e-5, batch 32.

Departures from the original, deliberate:

* **The logits are the margin** ``l⁺ − l⁻`` [B, K] rather than the pair [B, 2, K]: its sigmoid
  is the original's softmax probability, so the loss, mAP and the 0.5 threshold are the same,
  and every adapt tool that reads [B, K] scores (predict, compare, the contract) reads it.
  ``pair_logits`` gives the pair.
* **Which tokens.** The original runs only on ResNets: ``z_j = c_proj(v_proj(x_j + pos_j))`` for
  layer4's tokens and their mean (the attention pool's value path; its issue #6 on ViTs is
  unanswered). Here ``features: value`` (default) reads the same value path wherever the backbone
  has one (``adapt/dense.py``: a ViT's last block with each token attending to itself, MaskCLIP's
  trick; on a ResNet ``c_proj(v_proj(layer4))`` *without* the positional embedding the original
  adds), and ``features: tokens`` the last block's projected tokens. The global token of the
  softmax is the pooled image feature (``global_token``), where the original uses the value path
  of layer4's mean: on a ViT there is no mean token to match, and the pooled feature is CLIP's own
  summary of the image. Logits therefore cannot match the original's numbers on the same RN
  weights; ``tests/test_dualcoop.py`` pins the head to the original's formula on given tokens.
* The constants 20 and 5 are Config fields (``spatial_scale``, ``logit_scale``) with the
  original's values; its ``TRAINER.COOP_MLC.LS`` is stored there but never used, and is not
  offered.
* The original fine-tunes nothing but the prompts by default (``FINETUNE_BACKBONE`` /
  ``FINETUNE_ATTN`` off); those options are not offered. Its RandAugment + Cutout training
  augmentation at 448 px is the recipe's business; the shipped recipes use adapt's augmentation.
* Its zero-shot split (train on seen classes, F1@3 on unseen) is the multi-label task's top-k
  metrics over whatever class list the run evaluates; the seen/unseen split files are the data's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapt.methods.base import Method, as_output
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method
from adapt.tasks.losses import asymmetric_loss

FEATURES = ("value", "tokens")


@dataclass
class DualCoOpConfig:
    n_ctx_pos: int = 16
    n_ctx_neg: int = 16
    # "" = random N(0, init_std) init; words initialise from their embeddings (their count sets M)
    ctx_init_pos: str = ""
    ctx_init_neg: str = ""
    csc: bool = False  # class-specific contexts (the original's --csc)
    init_std: float = 0.02
    # the spatial tokens: "value" (the value path, the original's choice) or "tokens"
    features: str = "value"
    # the pooled image feature joins the spatial tokens (the original's mean token)
    global_token: bool = True
    spatial_scale: float = 20.0  # the softmax sharpness over tokens (the original's 20)
    logit_scale: float = 5.0  # the aggregated logits' scale (the original's 5: 5 · 20 = 100)
    # asymmetric loss (DualCoOp's opts.py: --gamma_neg 2, --gamma_pos 1; clip 0.05; --loss_w 1)
    gamma_neg: float = 2.0
    gamma_pos: float = 1.0
    clip: float = 0.05
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"method.features={self.features!r} is not one of {', '.join(FEATURES)}")
        if (self.n_ctx_pos < 1 and not self.ctx_init_pos) or (self.n_ctx_neg < 1 and not self.ctx_init_neg):
            raise ValueError("n_ctx_pos and n_ctx_neg must be >= 1 (or give ctx_init_pos / ctx_init_neg)")
        if self.spatial_scale <= 0 or self.logit_scale <= 0 or self.loss_weight <= 0:
            raise ValueError("spatial_scale, logit_scale and loss_weight must be > 0")


@register_method("dualcoop")
class DualCoOp(Method):
    Config = DualCoOpConfig
    trainable_kind = "text context"
    supports_feature_cache = True
    tasks = ("multi_label",)

    def __init__(self, config: DualCoOpConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.dense_inputs = (("pooled",) if config.global_token else ()) + (config.features,)
        self.repointable = not config.csc
        self.repoint_fix = "method.csc=false"
        n = len(self.classnames)
        self.positive = ContextPrompts(backbone, config.n_ctx_pos, config.ctx_init_pos, config.csc,
                                       "end", n, config.init_std)
        self.negative = ContextPrompts(backbone, config.n_ctx_neg, config.ctx_init_neg, config.csc,
                                       "end", n, config.init_std)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.positive.build(self.classnames)
        self.negative.build(self.classnames)

    def text_features(self) -> torch.Tensor:
        """[2, K, d]: the normalised positive and negative class features."""
        return self.cached_text_features(
            lambda: torch.stack([self.positive.text_features(), self.negative.text_features()]))

    def tokens_of(self, x: torch.Tensor) -> torch.Tensor:
        """[B, J, d] normalised tokens of images or cached dense features: global first."""
        dense = self.dense_features_of(x)
        spatial = getattr(dense, self.config.features)
        return torch.cat([dense.pooled[:, None], spatial], 1) if self.config.global_token else spatial

    def pair_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The original's [B, 2, K] logits (index 0 negative, 1 positive)."""
        cfg = self.config
        z = self.tokens_of(x)
        s = cfg.spatial_scale * torch.einsum("bjd,ckd->bckj", z, self.text_features().to(z.dtype))
        w = F.softmax(s[:, :1], dim=-1)  # the positive map weighs both branches
        return cfg.logit_scale * (w * s.flip(1)).sum(-1)  # [B, 2, K]: negative first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = self.pair_logits(x)
        return pair[:, 1] - pair[:, 0]

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return cfg.loss_weight * asymmetric_loss(as_output(out).logits, labels, cfg.gamma_neg, cfg.gamma_pos,
                                                 cfg.clip)
