"""UPT, unified prompt tuning (Zang et al., arXiv 2210.07225; code: yuhangzang/UPT at 3d1640f,
``trainers/unified.py``, registered there as ``Unified_v6``).

One set of learnable tokens ``U`` [n_ctx + n_vision, text_width] goes through one small
transformer layer (single-head self-attention, then a ReLU MLP, both post-norm residual, dropout
0.1); its first ``n_ctx`` outputs are CoOp's context (class name at the end), the others, through
``Linear(text_width, vision_width)``, are shallow visual prompts (entering the image tower at its
input, with no positional embedding). Logits are CLIP's, the loss cross-entropy.

Attention (``attention``): the released code hands ``U`` [1, 2n, D] to a sequence-first
``nn.MultiheadAttention``, which reads it as a sequence of length one with 2n batch entries, so
every token attends only to itself and the "unified" layer is a per-token transform; the paper
describes self-attention across all prompt tokens. The default is the code's (``token``);
MVLPT's independent UPT (sIncerass/MVLPT, ``forward_mvlpt_proj``)
reads its prompts the same way. The paper's is ``attention: joint`` (the same weights, one
sequence of 2n tokens).

Departures from the original code:
* the text and vision token counts are two options (``n_ctx``, ``n_vision``); the code hard-codes
  4 text tokens (``src[0, :4]``) and takes the other ``2n - 4`` as visual prompts, where ``n`` is the
  word count of ``CTX_INIT`` ("a photo of a": 4 + 4, the defaults here). ``CTX_INIT``'s embeddings are
  unused by the code (``uni_ctx`` is random N(0, 0.02)), so there is no ``ctx_init`` option: the
  prompt reads "X X X X <class>." with the generated context in the X slots, as the code's does.
* the visual prompts are appended after the patch tokens (the code inserts them after the class
  token); they carry no positional embedding and vision attention is unmasked, so the pooled
  feature is the same up to summation order.
* fp32 (the backbone's dtype) where the configs run fp16.
Kept from the code: the generator runs twice per training step, once for the text and once for the
visual prompts, so the two get independent dropout masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import Method
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method

ATTENTION = ("token", "joint")


@dataclass
class UPTConfig:
    # text context tokens (the code's hard-coded 4) and visual prompt tokens (2n - 4 = 4 with the
    # configs' CTX_INIT "a photo of a", configs/trainers/Unified/vit_b16_ep50.yaml)
    n_ctx: int = 4
    n_vision: int = 4
    # token: each token attends only to itself (the released code's length-one sequence);
    # joint: self-attention across all n_ctx + n_vision tokens (the paper's description)
    attention: str = "token"
    # the generator's dropout (attention weights, both residual branches, inside the MLP)
    dropout: float = 0.1
    # U ~ N(0, init_std)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"method.attention={self.attention!r} is not one of {ATTENTION}: 'token' (the "
                             "released code, each prompt token attends to itself) or 'joint' (the paper)")
        if self.n_ctx < 1 or self.n_vision < 1:
            raise ValueError(f"method.n_ctx and method.n_vision must be >= 1 (UPT prompts both towers), "
                             f"got n_ctx={self.n_ctx}, n_vision={self.n_vision}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0:
            raise ValueError(f"method.init_std must be > 0, got {self.init_std}")


class UnifiedPromptGenerator(nn.Module):
    """The code's PromptLearner minus the CoOp assembly: ``U`` through one post-norm transformer
    layer; ``text()`` its first ``n_ctx`` outputs, ``vision()`` the rest projected to the image
    tower's width. Module names follow the code's (``self_attn``, ``norm1`` ...)."""

    def __init__(self, n_ctx: int, n_vision: int, width: int, vision_width: int, attention: str,
                 dropout: float, init_std: float):
        super().__init__()
        self.n_ctx, self.attention = n_ctx, attention
        self.uni_ctx = nn.Parameter(torch.empty(n_ctx + n_vision, width).normal_(std=init_std))
        self.self_attn = nn.MultiheadAttention(width, 1, dropout=dropout)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.linear1, self.linear2 = nn.Linear(width, width), nn.Linear(width, width)
        self.mlp = nn.Linear(width, vision_width)

    def tokens(self) -> torch.Tensor:
        """The layer's output [n_ctx + n_vision, width] (a fresh dropout draw in training)."""
        # sequence-first attention: [1, N, D] is N sequences of one token (the code), [N, 1, D]
        # one sequence of N tokens (the paper)
        src = self.uni_ctx.unsqueeze(0) if self.attention == "token" else self.uni_ctx.unsqueeze(1)
        src = self.norm1(src + self.dropout1(self.self_attn(src, src, src, need_weights=False)[0]))
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(self.norm2(src))))))
        return src[0] if self.attention == "token" else src[:, 0]

    def text(self) -> torch.Tensor:
        return self.tokens()[:self.n_ctx]

    def vision(self) -> torch.Tensor:
        return self.mlp(self.tokens()[self.n_ctx:])


@register_method("upt")
class UPT(Method):
    Config = UPTConfig
    trainable_kind = "shared prompt generator (text context + visual prompts)"

    def __init__(self, config: UPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        width = backbone.text_width
        vision_width = backbone.vision_width  # a clear TypeError on a non-ViT image tower
        device = backbone.logit_scale.device
        self.generator = UnifiedPromptGenerator(config.n_ctx, config.n_vision, width, vision_width,
                                                config.attention, config.dropout, config.init_std
                                                ).to(device=device, dtype=backbone.dtype)
        # the prompt layout ("[SOS] X … X <class>. [EOS]"); its own context is never used
        self.prompts = ContextPrompts(backbone, config.n_ctx, "")
        self.prompts.ctx.requires_grad_(False)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.prompts.build(self.classnames)

    def text_features(self) -> torch.Tensor:
        return self.cached_text_features(lambda: self.prompts.text_features(self.generator.text()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.backbone.encode_image(images, prompts=self.generator.vision())
        return self.backbone.logits(image_features, self.text_features())
