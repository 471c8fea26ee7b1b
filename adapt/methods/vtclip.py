"""VT-CLIP (Qiu, Zhang et al., "VT-CLIP: Enhancing Vision-Language Models with Visual-guided
Texts", arXiv 2112.02399). No code was released ("The code will be released soon", v1 abstract);
only the abstracts (v1, v3) and third-party summaries were readable through our tools, so every
hyper-parameter below is ours unless it says "paper". With ``t_k`` the frozen hand-written class
feature, ``F`` [HW, d] the image's patch tokens and ``f`` its pooled feature (all L2-normalised)::

    q_k = t_k W_q,  K = F W_k,  V = F W_v                    (per head h of width d_h = d / H)
    o_k = concat_h softmax_HW(q_k^h K^hᵀ / √d_h) V^h · W_o    (text queries, image keys/values)
    t'_k = t_k + α · o_k                                      (per image; ``layers`` > 1 repeats it
                                                              with t' as the next query)
    logit_k = s · cos(f, t'_k)                                (s: the backbone's logit scale)

trained with cross-entropy on few-shot labels, CLIP frozen. Choices, and where each comes from:

* Structure (paper abstract): class text features are the queries of a cross-attention over the
  image's local visual features (keys, values); the attended output updates the text features,
  which are matched with the image. Residual update and cosine logits with the global feature:
  the seed brief (notes/seed-systems/joint-dense-multilabel.md §7) from a secondary review.
* Visual tokens (chosen): the last block's patch tokens through ``ln_post`` and the projection
  (``adapt/dense.py`` ``tokens``; the attention pool at every position on a ResNet), L2-normalised,
  because the queries live in the joint space and CALIP (same group) attends over exactly these.
* One layer, H = d / 64 heads (8 on ViT-B/16), no FFN, no LayerNorm (chosen): CLIP's head width;
  inputs are unit vectors already; no self-attention among the classes, so each class's logit
  depends only on its own name and the image (re-pointable to novel classes, not class-coupled).
* Residual ratio α = 0.5 (chosen; the paper's value is not known to us; between CLIP-Adapter's
  0.2 and an equal blend). At α = 0 the logits are zero-shot CLIP's exactly.
* Init (chosen): W_q, W_k, W_v Xavier-uniform (``nn.MultiheadAttention``'s), biases 0, W_o = 0,
  so training starts from zero-shot CLIP (and the update is learned, never random noise).
* Classifier (chosen): the dataset's first hand-written template (``ensemble: true`` averages all),
  as CLIP-Adapter, the baseline family VT-CLIP compares with.
* Schedule and loss (chosen, the recipes): the CoOp / CLIP-Adapter few-shot protocol the paper's
  11-dataset evaluation follows: SGD lr 0.002, momentum 0.9, wd 5e-4, batch 32, 200 epochs,
  cosine after one constant warm-up epoch at 1e-5, 16 shots; plain cross-entropy.
* Memory: the per-image class features are [B, K, d]; without gradients (evaluation) they are
  computed ``class_chunk`` classes at a time and reduced to logits at once, so 1000 classes never
  hold [B, 1000, HW] attention maps at eval batch sizes.
Departures: with no code and no readable paper text there is no known setting to depart from;
every item above marked "chosen" is a choice, to be replaced by the paper's value when known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import HandWrittenClassifier, check_templates
from adapt.methods.registry import register_method


@dataclass
class VTCLIPConfig:
    # α: weight of the attended visual feature added to each class's text feature (0: zero-shot)
    ratio: float = 0.5
    # cross-attention layers, each t <- t + α·attn(t, tokens); heads: null = d // 64 (at least 1)
    layers: int = 1
    heads: Optional[int] = None
    # xavier: W_q, W_k, W_v Xavier-uniform and W_o zero (start = zero-shot); random: W_o Xavier too
    init: str = "xavier"
    # classes per evaluation chunk (bounds the [B, classes, HW] attention without gradients)
    class_chunk: int = 128
    # hand-written classifier: all of the dataset's templates averaged, or the first only
    ensemble: bool = False
    templates: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_templates(self.templates)
        problems = []
        if not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio and math.isfinite(self.ratio)):
            problems.append(f"ratio={self.ratio!r} must be a finite number >= 0 (0 = zero-shot CLIP)")
        if not (isinstance(self.layers, int) and self.layers >= 1):
            problems.append(f"layers={self.layers!r} must be an integer >= 1")
        if self.heads is not None and not (isinstance(self.heads, int) and self.heads >= 1):
            problems.append(f"heads={self.heads!r} must be an integer >= 1 dividing the feature width, or null")
        if self.init not in ("xavier", "random"):
            problems.append(f"init={self.init!r} must be 'xavier' (W_o = 0) or 'random'")
        if not (isinstance(self.class_chunk, int) and self.class_chunk >= 1):
            problems.append(f"class_chunk={self.class_chunk!r} must be an integer >= 1")
        if problems:
            raise ValueError("vtclip: " + "; ".join(problems))


class TextToImageAttention(nn.Module):
    """Multi-head cross-attention with class features as queries and image tokens as keys and
    values: ``forward(queries [K, d] or [B, K, d], tokens [B, HW, d]) -> [B, K, d]``."""

    def __init__(self, dim: int, heads: int, zero_out: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vtclip: heads={heads} does not divide the feature width {dim}; "
                             f"pick a divisor of {dim} (or null for {max(1, dim // 64)})")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if zero_out:
            nn.init.zeros_(self.out.weight)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # [..., H, N, d_h]

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(tokens)), self.split(self.v(tokens))  # [B, H, HW, d_h]

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q = self.split(self.q(queries))  # [H, K, d_h] or [B, H, K, d_h]
        attn = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, K, HW]
        return self.out((attn @ values).transpose(-3, -2).flatten(-2))  # [B, K, d]

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.attend(queries, *self.keys_values(tokens))


@register_method("vtclip")
class VTCLIP(HandWrittenClassifier):
    Config = VTCLIPConfig
    trainable_kind = "text-to-image cross-attention (visual-guided class features)"
    supports_feature_cache = True
    dense_inputs = ("pooled", "tokens")

    def __init__(self, config: VTCLIPConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        dim = backbone.embed_dim
        heads = config.heads or max(1, dim // 64)
        self.attention = nn.ModuleList([TextToImageAttention(dim, heads, config.init == "xavier")
                                        for _ in range(config.layers)])
        self.rebuild_classes()

    def guided_text(self, text: torch.Tensor, keys_values: list) -> torch.Tensor:
        """The visual-guided class features [B, K, d] (unnormalised) of ``text`` [K, d], given
        each layer's keys and values of the images' tokens (``keys_values``)."""
        t = text  # [K, d] for the first layer, [B, K, d] after it
        for layer, (k, v) in zip(self.attention, keys_values):
            t = t + self.config.ratio * layer.attend(t, k, v)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.dense_features_of(x)
        f = dense.pooled
        kv = [layer.keys_values(dense.tokens) for layer in self.attention]
        text = self.text_features.to(f.dtype)
        # with gradients the whole class list at once (autograd keeps every chunk's graph anyway)
        step = text.shape[0] if torch.is_grad_enabled() else self.config.class_chunk
        return torch.cat([self.backbone.logits(f, F.normalize(self.guided_text(chunk, kv), dim=-1))
                          for chunk in text.split(step)], dim=1)
