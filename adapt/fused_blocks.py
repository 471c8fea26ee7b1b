"""The text and image towers' residual blocks run by the wrapper itself (``fast_blocks``).

open_clip's ``ResidualAttentionBlock`` goes through ``nn.MultiheadAttention``, whose CPU path
spends a third of a ViT-B/16 forward outside the matrix products. These functions compute the
same block on the same weights (read live, so anything that changes them stays exact): one fused
q/k/v product, ``scaled_dot_product_attention`` on strided views of it, the head merge a view of
the kernel's output. The pieces are separate so that attention over other keys and values (the
shared prompt prefix of ``adapt/text_prefix.py``) reuses them unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from open_clip.transformer import ResidualAttentionBlock

from adapt.process import bound_heap, reuse_heap

__all__ = ["block_pass", "fused_block", "fused_block_head", "fused_block_ok", "fused_qkv", "fused_residual"]


def fused_block_ok(block: nn.Module, mask: Optional[torch.Tensor] = None) -> bool:
    """``fused_block`` computes exactly this block: open_clip's ``ResidualAttentionBlock`` with a
    plain ``nn.MultiheadAttention`` (not wrapped, e.g. by an adapter library), self-attention,
    no hooks (they would be skipped), and an additive float mask or none."""
    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and type(attn) is nn.MultiheadAttention
            and attn._qkv_same_embed_dim and attn.in_proj_bias is not None
            and not hasattr(block, "ln_1_kv") and attn.dropout == 0.0
            and not (block._forward_hooks or block._forward_pre_hooks
                     or attn._forward_hooks or attn._forward_pre_hooks)
            and (mask is None or mask.is_floating_point()))


def fused_qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's queries, keys and values [B, H, L, hd] of batch-first ``x`` [B, L, D]: one
    product, then three strided views of it (no copy before the attention kernel)."""
    attn = block.attn
    b, n, d = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    return qkv.view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)


def fused_residual(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The rest of the block from the attention's output ``out`` [B, H, L, hd]: the head merge
    (a view: the kernel writes [B, L, H, hd]), output projection, both residuals and the MLP."""
    b, n, d = x.shape
    x = x + block.ls_1(block.attn.out_proj(out.transpose(1, 2).reshape(b, n, d)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def fused_block(block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                causal: bool = False) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` on batch-first ``x`` [B, L, D], with the
    attention as one q/k/v product and ``scaled_dot_product_attention`` (same weights, same
    scale ``1/sqrt(head_dim)``, same additive mask)."""
    q, k, v = fused_qkv(block, x)
    if causal:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(x.dtype))
    return fused_residual(block, x, out)


def fused_block_head(block: nn.Module, x: torch.Tensor, n: int = 1) -> torch.Tensor:
    """``fused_block``'s output for the first ``n`` tokens of ``x`` [B, L, D] only, [B, n, D]:
    every token's keys and values, queries and the rest of the block for those ``n``. A tower
    pooled by its class token reads nothing else of its last block, whose other rows (their
    queries, attention, output projection and MLP) are 7 % of a ViT-B/16 forward. Same weights
    and operations as ``fused_block``, split into a query and a key/value product."""
    attn = block.attn
    b, length, d = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(h[:, :n], w[:d], bias[:d]).view(b, n, heads, d // heads).transpose(1, 2)
    kv = F.linear(h, w[d:], bias[d:]).view(b, length, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    return fused_residual(block, x[:, :n], F.scaled_dot_product_attention(q, k, v))


def block_pass(fn: Callable, args: tuple, graph: bool, ckpt: bool):
    """``fn(*args)`` for one block; activation-checkpointed when asked and a backward pass will
    come through it (``graph``). The run's heap policy follows its first graph-building pass
    (``adapt/process.py``), so every block reports which kind it was."""
    if ckpt and graph:
        bound_heap()
        return checkpoint(fn, *args, use_reentrant=False)
    out = fn(*args)
    if graph:
        reuse_heap()
    return out
