"""open_clip's attention with separate query / key / value projections, so peft can target each.

open_clip's blocks use ``nn.MultiheadAttention``, whose input projection is one fused
``in_proj_weight`` [3D, D]: an adapter library sees a single parameter, not three layers, and
cannot put a low-rank update on the queries alone (CLIP-LoRA's placement needs q, k and v each).
``SplitAttention`` is the same computation with ``q_proj`` / ``k_proj`` / ``v_proj`` as three
``nn.Linear`` layers holding the three row blocks of the fused weight, and the original
``out_proj`` module kept as it is. It is an exact rewrite (``tests/test_weight_space.py`` pins it
against ``nn.MultiheadAttention`` to 1e-5, both towers, with the text tower's causal mask), and it
takes open_clip's call (``attn(q, k, v, need_weights=False, attn_mask=mask)[0]``), so the block
around it runs unchanged.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitAttention", "split_attention"]


class SplitAttention(nn.Module):
    """Self-attention of ``nn.MultiheadAttention`` with three input projections (weights copied
    from ``mha``; the scale is ``1/sqrt(head_dim)`` and the mask additive, as there)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
            raise TypeError("SplitAttention rewrites self-attention with a fused, biased input "
                            "projection (open_clip's blocks); this nn.MultiheadAttention is not one")
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.batch_first = d, mha.num_heads, mha.batch_first
        self.dropout = mha.dropout
        weight, bias = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            proj = nn.Linear(d, d, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                proj.weight.copy_(weight[i * d:(i + 1) * d])
                proj.bias.copy_(bias[i * d:(i + 1) * d])
            proj.requires_grad_(mha.in_proj_weight.requires_grad)
            setattr(self, name, proj)
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if need_weights:
            raise ValueError("SplitAttention computes no attention weights (need_weights=False)")
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SplitAttention is self-attention: key and value must be the query")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, H, L, hd], a view
            return t.view(b, n, heads, d // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if attn_mask is not None and not attn_mask.is_floating_point():
            # nn.MultiheadAttention's boolean masks mark the *masked* positions
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attn_mask is None else attn_mask.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal and attn_mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(blocks: Iterable[nn.Module]) -> int:
    """Replace the ``attn`` of each given block (open_clip residual blocks) by its
    ``SplitAttention``; blocks already split are left alone. Returns how many were replaced."""
    done = 0
    for block in blocks:
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            block.attn = SplitAttention(attn)
            done += 1
        elif not isinstance(attn, SplitAttention):
            raise TypeError(f"cannot split the attention of {type(block).__name__}: its attn is "
                            f"{type(attn).__name__}, not nn.MultiheadAttention")
    return done
