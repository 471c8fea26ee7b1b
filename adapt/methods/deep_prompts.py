"""Per-layer prompt tokens for deep prompting (deep VPT, IVLP, MaPLe, PromptSRC).

Layer ``i``'s tokens enter a tower before its block ``i`` and replace the previous layer's prompt
slots, through the backbone's ``deep_prompts`` hook; a tower's prompt *depth* is how many of its
blocks (from the first) receive tokens. Depths beyond a tower's number of blocks are capped.

Text prompts follow CoOp's layout ``[SOS] ctx_1 … ctx_n <class name>. [EOS]``: layer 0's tokens are
CoOp's context (``ContextPrompts``), initialised from a hand-written text; deeper layers get new
N(0, 0.02) tokens in the ctx slots. Vision prompts are appended after the patch tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from adapt.backbone import ClipBackbone
from adapt.methods.prompts import ContextPrompts


def capped_depth(depth: int, tower_depth: int) -> int:
    return max(0, min(int(depth), int(tower_depth)))


def layer_tokens(backbone: ClipBackbone, n_layers: int, n_tokens: int, width: int,
                 std: float = 0.02) -> nn.ParameterList:
    """``n_layers`` learnable [n_tokens, width] tensors, N(0, std) as VPT-in-CLIP / IVLP / MaPLe."""
    device = backbone.logit_scale.device
    return nn.ParameterList([
        nn.Parameter(torch.empty(n_tokens, width, device=device).normal_(std=std).to(backbone.dtype))
        for _ in range(n_layers)])


def text_context(backbone: ClipBackbone, n_ctx: int, ctx_init: str, init_std: float = 0.02) -> ContextPrompts:
    """Layer-0 text context, as MaPLe / IVLP / PromptSRC initialise it: the prompt reads the whole
    ``ctx_init`` text and its first ``n_ctx`` tokens are learnable; the rest of the text stays a
    fixed part of the prompt (n_ctx=2 with "a photo of a": "a photo" learnable, "of a" fixed).
    Without ``ctx_init`` the ``n_ctx`` vectors are random N(0, init_std), as in CoOp."""
    if not ctx_init:
        prompts = ContextPrompts(backbone, n_ctx, "", init_std=init_std)
    else:
        prompts = ContextPrompts(backbone, n_ctx, ctx_init)  # ctx = all tokens of the text
        if n_ctx > prompts.n_ctx:
            raise ValueError(f"n_ctx={n_ctx} but ctx_init {ctx_init!r} has only {prompts.n_ctx} tokens; "
                             "use a longer ctx_init, a smaller n_ctx, or ctx_init='' (random init)")
        if n_ctx < prompts.n_ctx:
            prompts.n_ctx = n_ctx
            prompts.ctx = nn.Parameter(prompts.ctx.detach()[:n_ctx].clone())
    if n_ctx == 0:
        prompts.ctx.requires_grad_(False)  # the hand-written prompt, nothing to learn
    return prompts


class DeepTextPrompts(nn.Module):
    """Text prompts at the first ``depth`` blocks of the text tower (``n_ctx`` tokens each)."""

    def __init__(self, backbone: ClipBackbone, n_ctx: int, depth: int, ctx_init: str = "a photo of a",
                 init_std: float = 0.02):
        super().__init__()
        self.backbone = [backbone]  # a list: not a submodule, the method owns the backbone
        self.depth = capped_depth(depth, backbone.text_depth) if n_ctx > 0 else 0
        self.n_ctx = n_ctx if self.depth else 0
        self.context = text_context(backbone, self.n_ctx, ctx_init, init_std)
        self.deep = layer_tokens(backbone, max(self.depth - 1, 0), self.n_ctx, backbone.text_width, init_std)

    def build(self, classnames: Sequence[str]) -> None:
        self.context.build(classnames)

    def layers(self) -> list[torch.Tensor]:
        """The tokens of every prompted layer: [ctx, deep_1, …, deep_{depth-1}] ([] at depth 0)."""
        return [self.context.ctx, *self.deep] if self.depth else []

    def features(self) -> torch.Tensor:
        """Normalized class text features [C, d]."""
        return self.context.text_features(deep_prompts=[None, *self.deep], prompt_start=1)


class DeepVisionPrompts(nn.Module):
    """Vision prompts at the first ``depth`` blocks of a ViT tower (``n_tokens`` each).

    Building one (with tokens) on a non-ViT tower raises the backbone's TypeError, at build time."""

    def __init__(self, backbone: ClipBackbone, n_tokens: int, depth: int, init_std: float = 0.02):
        super().__init__()
        self.backbone = [backbone]
        width, self.depth = 0, 0
        if n_tokens > 0 and depth > 0:
            width = backbone.vision_width  # TypeError for towers without visual prompt slots
            self.depth = capped_depth(depth, backbone.vision_depth)
        self.n_tokens = n_tokens if self.depth else 0
        self.tokens = layer_tokens(backbone, self.depth, self.n_tokens, width, init_std)

    def layers(self) -> list[torch.Tensor]:
        return list(self.tokens)


def encode_prompted_images(backbone: ClipBackbone, images: torch.Tensor,
                           layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Image features with ``layers[i]`` replacing the prompt slots before vision block ``i``
    (layer 0's tokens are appended after the patch tokens); no layers = the frozen encoder."""
    if not layers:
        return backbone.encode_image(images)
    return backbone.encode_image(images, prompts=layers[0], deep_prompts=list(layers))
