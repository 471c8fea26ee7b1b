"""MVLPT (Shen et al., "Multitask Vision-Language Prompt Tuning", arXiv 2211.11720;
sIncerass/MVLPT ``trainers/mvlpt.py``): prompts learned on several source tasks at once, then
used to start each target task's few-shot training.

The prompt families of its ``MultitaskVLPromptLearner``, picked by ``prompts``:
- ``coop`` (MCoOp): 16 text context vectors, N(0, 0.02), the class name in the middle (its
  ``COOP.CLASS_TOKEN_POSITION`` default and scripts);
- ``vpt`` (MVPT): deep visual prompts, 16 tokens before every block of the image tower, each
  block's replacing the previous block's. The init is uniform(±√(6 / (3·p² + D))), its "xavier"
  on patch size p and width D. The text is the frozen prompt ``"a photo of a <class>."``, the
  learner's prefix when it has no text context.
- ``upt`` (MUPT, ``forward_mvlpt_proj``): both of the above (``n_ctx`` text tokens, ``n_ctx``
  vision tokens per block), coupled: every text and vision token is mapped to 128 wide
  (``PROJECT_DIM``; ``Linear`` where the width differs), goes through one CLIP residual attention
  block (``Transformer(width=128, layers=1, heads=1)``: pre-LN, QuickGELU MLP) and back through a
  ``Linear`` per tower. The code hands the block the tokens as [1, N, 128] while CLIP's
  transformer is sequence-first, so each token is a sequence of its own and attends only to
  itself; that is kept (as UPT's ``attention: token``): the coupling is the shared block's weights.

The two stages are two runs:
1. **Source**: ``data.setting: multi_task`` over the source datasets with
   ``data.multi_task.classifier: union`` (the code concatenates the datasets' classes into one
   softmax). Repeat over seeds.
2. **Target**: the target dataset alone, ``warm_start: [<source run dirs>]``. The source seeds'
   prompts are averaged (``scripts/avg_ckpt.py``) and training starts from them (``--model-dir``).

Defaults: ``configs/trainers/MVLPT/vit_b16.yaml``: SGD lr 0.002, 200 epochs, cosine, one warm-up
epoch at 1e-5, batch 32. Attention does not see token order without position embeddings, so MVPT's
tokens "after the CLS token" are adapt's prompt slots after the patch tokens, which is the same
computation. CoOp's encoder reads the text prompts; with ``prompts: coop`` the image features
are the frozen encoder's, so that variant trains on cached features.

Deliberate departures from the original:
- fp32 by default (``PREC fp16`` in the original).
- The text prompt is cut to the tokenizer's context length, not to the longest prompt
  (``CUT_CONTEXTLEN``). The two are identical for a causal text encoder.
- MUPT's projection block and Linears start from the same distributions as the code's (PyTorch's
  defaults), not from its random stream.
- ELEVATER's multi-label tasks and metrics are not part of ``multi_task``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from adapt.methods.base import Method, zero_shot_text_features
from adapt.methods.deep_prompts import DeepVisionPrompts, encode_prompted_images
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method

PROMPTS = ("coop", "vpt", "upt")
VPT_TEXT = "a photo of a {}."  # the learner's prefix "a photo of a " + name + "."


@dataclass
class MVLPTConfig:
    prompts: str = "coop"  # coop (MCoOp) | vpt (MVPT) | upt (MUPT)
    n_ctx: int = 16  # COOP.N_CTX / VPT.N_CTX of the README's commands for ViT-B/16
    class_token_position: str = "middle"  # MCoOp's COOP.CLASS_TOKEN_POSITION
    init_std: float = 0.02  # MCoOp's context init
    project_dim: int = 128  # MUPT: the coupling block's width (MVLPT.PROJECT_DIM)

    def __post_init__(self) -> None:
        if self.prompts not in PROMPTS:
            raise ValueError(f"method.prompts={self.prompts!r} is not one of {', '.join(PROMPTS)} "
                             f"(MVLPT's MCoOp, MVPT and MUPT)")
        if self.n_ctx < 1 or self.project_dim < 1:
            raise ValueError(f"method.n_ctx and method.project_dim must be >= 1, got {self.n_ctx}, "
                             f"{self.project_dim}")


def xavier_bound(backbone, width: int) -> float:
    """MVPT's init bound √(6 / (3·p² + D)) on the tower's patch size p."""
    patch = backbone.model.visual.conv1.kernel_size[0]
    return math.sqrt(6.0 / (3 * patch ** 2 + width))


class CoupledPrompts(nn.Module):
    """MUPT's prompts: text context [n_ctx, text width] and vision tokens [depth, n_ctx, vision
    width], read through one shared residual attention block, each token on its own."""

    def __init__(self, backbone, n_ctx: int, dim: int, init_std: float):
        super().__init__()
        text_w, vision_w, depth = backbone.text_width, backbone.vision_width, backbone.vision_depth
        self.ctx = nn.Parameter(torch.empty(n_ctx, text_w).normal_(std=init_std))
        bound = xavier_bound(backbone, vision_w)
        self.vision_tokens = nn.Parameter(torch.empty(depth, n_ctx, vision_w).uniform_(-bound, bound))
        self.text_in, self.text_out = _to_and_from(text_w, dim)
        self.vision_in, self.vision_out = _to_and_from(vision_w, dim)
        self.block = ResidualAttentionBlock(dim, 1, act_layer=QuickGELU, batch_first=True)

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(text context [n_ctx, text width], one [n_ctx, vision width] per vision block)."""
        n, (depth, per, width) = self.ctx.shape[0], self.vision_tokens.shape
        tokens = torch.cat([self.text_in(self.ctx), self.vision_in(self.vision_tokens.reshape(-1, width))])
        out = self.block(tokens.unsqueeze(1))[:, 0]  # [N, 1, dim]: N sequences of one token (the code's)
        return self.text_out(out[:n]), list(self.vision_out(out[n:]).reshape(depth, per, width))


def _to_and_from(width: int, dim: int) -> tuple[nn.Module, nn.Module]:
    if width == dim:
        return nn.Identity(), nn.Identity()
    return nn.Linear(width, dim), nn.Linear(dim, width)


@register_method("mvlpt")
class MVLPT(Method):
    Config = MVLPTConfig
    trainable_kind = "text context, deep vision prompts, or both coupled"

    def __init__(self, config: MVLPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.supports_feature_cache = config.prompts == "coop"
        if config.prompts == "coop":
            self.prompts = ContextPrompts(self.backbone, config.n_ctx, "", position=config.class_token_position,
                                          init_std=config.init_std)
        elif config.prompts == "upt":
            self.coupled = CoupledPrompts(self.backbone, config.n_ctx, config.project_dim, config.init_std).to(
                device=self.backbone.logit_scale.device, dtype=self.backbone.dtype)
            # the layout "[SOS] X … X <class>. [EOS]" with the class in the middle; the context is generated
            self.prompts = ContextPrompts(self.backbone, config.n_ctx, "", position=config.class_token_position,
                                          learned=False)
        else:
            self.vision = DeepVisionPrompts(self.backbone, config.n_ctx, self.backbone.vision_depth)
            bound = xavier_bound(self.backbone, self.backbone.vision_width)
            with torch.no_grad():
                for tokens in self.vision.tokens:
                    tokens.uniform_(-bound, bound)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        if self.config.prompts in ("coop", "upt"):
            self.prompts.build(self.classnames)
        else:  # the frozen "a photo of a <class>." of a learner without text context
            self.register_buffer("frozen_text", zero_shot_text_features(self.backbone, self.classnames, [VPT_TEXT]),
                                 persistent=False)

    def text_features(self) -> torch.Tensor:
        if self.config.prompts == "coop":
            return self.cached_text_features(self.prompts.text_features)
        if self.config.prompts == "upt":
            return self.cached_text_features(lambda: self.prompts.text_features(self.coupled()[0]))
        return self.frozen_text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.prompts == "coop":  # images or their cached frozen features
            return super().forward(x)
        if self.config.prompts == "upt":
            return self.backbone.logits(encode_prompted_images(self.backbone, x, self.coupled()[1]),
                                        self.text_features())
        return self.backbone.logits(encode_prompted_images(self.backbone, x, self.vision.layers()), self.frozen_text)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features())
