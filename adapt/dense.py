"""What the towers give beyond the pooled feature: patch tokens, the value path, token maps of
several blocks, and token-level text outputs, each in one pass with the prompt hooks of today.

Image tower (``ClipBackbone.encode_image_dense``), a ``DenseImage`` with, on request:

* ``pooled`` [B, C]: exactly ``encode_image``'s feature (same blocks, same pooling);
* ``tokens`` [B, HW, C]: the last block's patch tokens through ``ln_post`` and the projection
  (DenseCLIP's and CALIP's ``proj(ln_post(x_L))``; PLOT's and DualCoOp's local features);
* ``value`` [B, HW, C]: MaskCLIP's value path: the last block with its attention replaced by
  each token attending only to itself (``x + out_proj(W_v ln_1(x) + b_v)``, then the MLP
  residual as in the original), through ``ln_post`` and the projection;
* ``levels`` {i: [B, W, h, w]}: the patch tokens after block ``i`` (0-based) as maps, raw
  (DenseCLIP's taps after blocks 3, 5, 7, 11 of ViT-B/16);
* ``grid`` (h, w).

Images whose patch grid is not the model's own get the positional embedding resampled
(bicubic), as the dense-prediction originals do. Visual prompts (``prompts`` / ``deep_prompts``)
enter exactly as in ``encode_image`` and never appear among the patch tokens; so does a
``patch_mask`` with its ``mask_token`` (MUST's masked patches).

ResNet towers (RN50, ...) have no patch tokens and no prompt hooks; they give ``pooled``,
``tokens`` = the attention pool's output with every position as its query (what
DenseCLIP-RN and CALIP-RN read; position 0 of the same attention is the pooled feature), and
``value`` = ``c_proj(v_proj(layer4))`` without the positional embedding (MaskCLIP-RN,
TaI-DPT's local features); ``levels`` are the outputs of ``layer1`` … ``layer4`` (taps 0–3).

Text tower (``encode_text_dense``): a ``DenseText`` with the pooled feature (exactly
``encode_text_embeddings``'s) and every position's ``ln_final`` output projected into the joint
space (TaI-DPT's local text features), cut to the longest sequence, with the mask of the
positions up to each sequence's end-of-text token (start- and end-of-text included, as TaI-DPT
keeps them).

``tests/test_dense.py`` pins the pooled outputs to ``encode_image`` / ``encode_text`` and the value
path to the block run with an attention mask that lets each token see only itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.backbone_ops import project as _project, replace_slots as _replace_slots, resample_positions
from adapt.backbone_loading import text_memory_plan

__all__ = ["DENSE_OUTPUTS", "DenseImage", "DenseText", "encode_image_dense", "encode_text_dense",
           "pack_dense", "unpack_dense"]

DENSE_OUTPUTS = ("pooled", "tokens", "value")


@dataclass
class DenseImage:
    grid: tuple[int, int]
    pooled: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None
    levels: dict[int, torch.Tensor] = field(default_factory=dict)

    def as_map(self, name: str) -> torch.Tensor:
        """``tokens`` or ``value`` as a [B, C, h, w] map."""
        x = getattr(self, name)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid)


@dataclass
class DenseText:
    pooled: torch.Tensor  # [N, C]
    tokens: torch.Tensor  # [N, L', C]
    mask: torch.Tensor  # [N, L'] True up to and including each end-of-text token


def pack_dense(dense: DenseImage, outputs: Sequence[str]) -> torch.Tensor:
    """``outputs`` of ``dense`` as one [B, T, C] tensor, in that order (pooled: one row; tokens
    and value: HW rows each): the form the feature cache stores and serves as a batch."""
    parts = [dense.pooled[:, None] if name == "pooled" else getattr(dense, name) for name in outputs]
    return torch.cat(parts, dim=1)


def unpack_dense(x: torch.Tensor, outputs: Sequence[str]) -> DenseImage:
    """The inverse of ``pack_dense`` (views, not copies), for a square patch grid."""
    maps = [name for name in outputs if name != "pooled"]
    rows = x.shape[1] - ("pooled" in outputs)
    hw = rows // max(len(maps), 1)
    side = round(hw ** 0.5)
    if maps and (side * side != hw or hw * len(maps) != rows):
        raise ValueError(f"packed dense features of {x.shape[1]} rows do not hold {list(outputs)} "
                         "on a square patch grid")
    out, start = DenseImage(grid=(side, side)), 0
    for name in outputs:
        n = 1 if name == "pooled" else hw
        setattr(out, name, x[:, start] if name == "pooled" else x[:, start:start + n])
        start += n
    return out


def _check(backbone, outputs: Sequence[str], taps: Sequence[int], depth: int) -> tuple[set, list]:
    outputs = set(outputs)
    unknown = sorted(outputs - set(DENSE_OUTPUTS))
    if unknown or not (outputs or taps):
        raise ValueError(f"dense outputs {unknown or '(none)'}: ask for any of {list(DENSE_OUTPUTS)} "
                         "and/or block taps")
    taps = sorted({int(t) for t in taps})
    bad = [t for t in taps if not 0 <= t < depth]
    if bad:
        raise ValueError(f"block taps {bad} are outside {backbone.config.name!r}'s {depth} image "
                         f"blocks; use indices 0..{depth - 1}")
    return outputs, taps


def encode_image_dense(backbone, images: torch.Tensor, outputs: Sequence[str] = ("pooled", "tokens"),
                       taps: Sequence[int] = (), prompts: Optional[torch.Tensor] = None,
                       deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       normalize: bool = True, patch_mask: Optional[torch.Tensor] = None,
                       mask_token: Optional[torch.Tensor] = None) -> DenseImage:
    images = images.to(backbone.dtype)
    visual = backbone.model.visual
    if not hasattr(visual, "class_embedding"):
        if prompts is not None or deep_prompts or patch_mask is not None:
            backbone._vit()  # the one "needs a ViT image tower" message
        return _resnet_dense(backbone, images, *_check(backbone, outputs, taps, 4), normalize)
    v = backbone._vit()
    if v.attn_pool is not None:
        raise TypeError(f"{backbone.config.name!r} pools its image tokens by attention (CoCa-style); "
                        "dense outputs need a class-token or mean-pooled ViT")
    blocks = v.transformer.resblocks
    outputs, taps = _check(backbone, outputs, taps, len(blocks))
    if prompts is None and deep_prompts:
        prompts = deep_prompts[0]
    x, n_tokens, grid = backbone._vit_embed(images, prompts, resample=True, patch_mask=patch_mask,
                                            mask_token=mask_token)
    out = DenseImage(grid=grid)
    # the last block runs in full only for the pooled feature or the final tokens
    full_last = bool(outputs & {"pooled", "tokens"}) or (len(blocks) - 1) in taps
    for i, block in enumerate(blocks):
        prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
        if i > 0 and prompt is not None:
            x = _replace_slots(x, prompt, n_tokens)
        if i == len(blocks) - 1:
            if "value" in outputs:
                out.value = _finish(v, _value_path(block, x[:, 1:n_tokens]), normalize)
            if not full_last:
                break
        x = backbone._run_block(block, x, None, v.transformer)
        if i in taps:
            out.levels[i] = x[:, 1:n_tokens].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    if "pooled" in outputs:
        pooled, _ = v._pool(x[:, :n_tokens])
        pooled = pooled @ v.proj if v.proj is not None else pooled
        out.pooled = F.normalize(pooled, dim=-1) if normalize else pooled
    if "tokens" in outputs:
        out.tokens = _finish(v, x[:, 1:n_tokens], normalize)
    return out


def _finish(v: nn.Module, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = v.ln_post(x)
    x = x @ v.proj if v.proj is not None else x
    return F.normalize(x, dim=-1) if normalize else x


def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last block: attention replaced by the value path (each token attends only to
    itself, so the attention output is ``out_proj(v)``), both residuals and the MLP kept."""
    attn = getattr(block, "attn", None)
    if not (type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim and hasattr(block, "ln_1")):
        raise TypeError(f"the value path needs open_clip's residual block with a plain "
                        f"nn.MultiheadAttention; the last image block has {type(attn).__name__}")
    d = x.shape[-1]
    bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    value = F.linear(block.ln_1(x), attn.in_proj_weight[2 * d:], bias)
    x = x + block.ls_1(attn.out_proj(value))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _resnet_dense(backbone, images: torch.Tensor, outputs: set, taps: list, normalize: bool) -> DenseImage:
    visual = backbone.model.visual
    pool = visual.attnpool
    x = visual.stem(images)
    levels = {}
    for i, layer in enumerate((visual.layer1, visual.layer2, visual.layer3, visual.layer4)):
        x = layer(x)
        if i in taps:
            levels[i] = x
    out = DenseImage(grid=(x.shape[2], x.shape[3]), levels=levels)
    seq = x.flatten(2).permute(2, 0, 1)  # [HW, B, C], as the attention pool lays it out
    if "value" in outputs:
        value = pool.c_proj(pool.v_proj(seq)).permute(1, 0, 2)
        out.value = F.normalize(value, dim=-1) if normalize else value
    if outputs & {"pooled", "tokens"}:
        seq = torch.cat([seq.mean(dim=0, keepdim=True), seq]) + resample_positions(pool.positional_embedding, out.grid).to(seq.dtype)[:, None]
        # every position as a query: position 0 is exactly the pool's own output
        query = seq if "tokens" in outputs else seq[:1]
        res, _ = F.multi_head_attention_forward(
            query=query, key=seq, value=seq, embed_dim_to_check=seq.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        res = res.permute(1, 0, 2)
        res = F.normalize(res, dim=-1) if normalize else res
        if "pooled" in outputs:
            out.pooled = res[:, 0]
        if "tokens" in outputs:
            out.tokens = res[:, 1:]
    return out


def encode_text_dense(backbone, x: torch.Tensor, tokens: torch.Tensor,
                      deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      prompt_start: int = 1, normalize: bool = True) -> DenseText:
    text = backbone.text
    if text.pool_type not in ("argmax", "eos"):
        raise TypeError(f"token-level text outputs need a tower pooled at its end-of-text token; "
                        f"{backbone.config.name!r} pools {text.pool_type!r}")
    grad = torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in deep_prompts or ()))
    eot = backbone.eot_positions(tokens)
    length = int(eot.max()) + 1 if backbone._text_is_causal() else x.shape[1]
    _, ckpt = text_memory_plan(backbone.config, x.shape[0], length, backbone.text_width,
                               backbone.text_depth, grad, x.element_size())
    hidden = backbone._text_hidden(x, tokens, deep_prompts, prompt_start, ckpt)
    feats = _project(hidden, text.text_projection)
    feats = F.normalize(feats, dim=-1) if normalize else feats
    positions = torch.arange(feats.shape[1], device=feats.device)
    return DenseText(pooled=feats[torch.arange(feats.shape[0], device=feats.device), eot],
                     tokens=feats, mask=positions[None] <= eot[:, None])
