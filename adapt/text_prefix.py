"""Prompts that share their first tokens: the shared positions go through the text tower once.

With the class name at the end (CoOp's default and the field's habit) every class's prompt starts
with the same ``[SOS] ctx_1 … ctx_M``, and the text tower is causal: those P positions' hidden
states are the same in every class's sequence (and, for CoCoOp, in every class of one image).
They run once per group (the step for CoOp, each image for CoCoOp), keeping their keys and values
at every block; each class then runs only its own suffix (name, ".", end-of-text), whose queries
attend to the group's prefix keys / values followed by its own, causally. Same weights, same
scale, a softmax over the same keys: exact to fp32 round-off against the full sequences, forward
and backward (``tests/test_text_prefix.py``). Per class the tower then runs about S instead of
P + S tokens (S: the suffix, cut to the longest prompt as the full path cuts).

The caller declares the sharing (``ContextPrompts``), never inferred from values: class-specific
contexts initialised alike are equal and still have their own gradients. What this path cannot
reproduce exactly runs the full sequences instead (``shared_prefix_ok``): blocks the fused path
does not know (LoRA / peft wrappers, hooks, ``fast_blocks: false``), a non-causal text tower,
deep prompts that are per sequence or reach past the shared positions, an end-of-text token
inside the prefix.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from adapt.backbone_ops import project as _project, replace_slots as _replace_slots
from adapt.backbone_loading import SAVED_VECTORS_PER_TOKEN, text_memory_plan
from adapt.fused_blocks import block_pass, fused_block_ok, fused_qkv, fused_residual

__all__ = ["encode_shared_prefix", "shared_prefix_ok"]


def shared_prefix_ok(backbone, prefix: torch.Tensor, tokens: torch.Tensor,
                     deep_prompts: Optional[Sequence[Optional[torch.Tensor]]], prompt_start: int) -> bool:
    """The shared-prefix pass computes exactly what the full sequences would."""
    text, p = backbone.text, prefix.shape[1]
    if not (backbone.config.fast_blocks and backbone._text_is_causal() and backbone._causal_mask()):
        return False
    if not all(fused_block_ok(b, text.attn_mask) for b in text.transformer.resblocks):
        return False
    if int(backbone.eot_positions(tokens).min()) < p:  # a pooled token inside the prefix
        return False
    # deeper layers' prompts must be shared too and land inside the prefix
    return all(d is None or (d.dim() == 2 and 0 <= prompt_start and prompt_start + d.shape[0] <= p)
               for d in (deep_prompts or ())[1:])


def encode_shared_prefix(backbone, prefix: torch.Tensor, suffix: torch.Tensor, tokens: torch.Tensor,
                         deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                         prompt_start: int = 1, normalize: bool = True) -> torch.Tensor:
    """Text features [G, C, d] of the G·C prompts ``cat(prefix[g], suffix[c])``.

    ``prefix`` [G, P, D]: each group's shared first embeddings; ``suffix`` [C, L - P, D]: each
    class's rest; ``tokens`` [C, L]: the classes' token ids (they locate the end-of-text token).
    ``deep_prompts`` as in ``encode_text_embeddings`` (shared [n, D] prompts at ``prompt_start``).
    """
    g, p, _ = prefix.shape
    c = suffix.shape[0]
    if not shared_prefix_ok(backbone, prefix, tokens, deep_prompts, prompt_start):
        return _full_sequences(backbone, prefix, suffix, tokens, deep_prompts, prompt_start, normalize)
    text = backbone.text
    blocks = text.transformer.resblocks
    grad = torch.is_grad_enabled() and (prefix.requires_grad or any(
        d is not None and d.requires_grad for d in deep_prompts or ()) or any(
        q.requires_grad for q in text.transformer.parameters()))
    pos = text.positional_embedding.to(prefix.dtype)

    # 1. the prefix, once per group: its keys and values at every block
    x, kv = prefix + pos[:p], []
    for i, block in enumerate(blocks):
        prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
        if i > 0 and prompt is not None:
            x = _replace_slots(x, prompt, prompt_start)
        x, k, v = block_pass(_prefix_block, (block, x), grad, False)  # G·P tokens: never worth a recompute
        kv.append((k, v))

    # 2. every (group, class) suffix against its group's prefix, in chunks of similar length
    eot = backbone.eot_positions(tokens) - p  # the pooled token's place in the suffix
    cls = torch.arange(c, device=tokens.device).repeat(g)
    grp = torch.arange(g, device=tokens.device).repeat_interleave(c)
    n, length = g * c, int(eot.max()) + 1
    # per sequence, a block keeps its suffix tokens' activations and the prefix keys / values
    # gathered for it (two vectors per prefix token) for the backward pass
    kept = length + math.ceil(2 * p / SAVED_VECTORS_PER_TOKEN)
    chunk, ckpt = text_memory_plan(backbone.config, n, kept, backbone.text_width, backbone.text_depth,
                                   grad, prefix.element_size())
    order = torch.argsort(eot[cls], stable=True)
    feats = []
    for rows in order.split(chunk if chunk and n > chunk else n):
        rc, rg = cls[rows], grp[rows]
        s = int(eot[rc].max()) + 1
        y = suffix[rc, :s].to(prefix.dtype) + pos[p:p + s]
        mask = _suffix_mask(p, s, y)
        for block, (k, v) in zip(blocks, kv):
            y = block_pass(_suffix_block, (block, y, k, v, rg, mask), grad, ckpt)
        y = text.ln_final(y)[torch.arange(len(rows), device=y.device), eot[rc]]
        feats.append(_project(y, text.text_projection))
    out = torch.cat(feats)[torch.argsort(order)]
    out = F.normalize(out, dim=-1) if normalize else out
    return out.view(g, c, -1)


def _prefix_block(block, x: torch.Tensor):
    """A fused block on the prefix (causal), returning its keys and values as well."""
    q, k, v = fused_qkv(block, x)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fused_residual(block, x, out), k, v


def _suffix_block(block, y: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor,
                  groups: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A fused block on suffix rows ``y`` [n, S, D]: the queries attend to their group's prefix
    keys / values (all of them) and to their own suffix (causally)."""
    q, k, v = fused_qkv(block, y)
    if k_pre.shape[0] == 1:  # one group: a broadcast view, no gather
        k_pre, v_pre = k_pre.expand(len(y), -1, -1, -1), v_pre.expand(len(y), -1, -1, -1)
    else:
        k_pre, v_pre = k_pre.index_select(0, groups), v_pre.index_select(0, groups)
    out = F.scaled_dot_product_attention(q, torch.cat([k_pre, k], dim=2), torch.cat([v_pre, v], dim=2),
                                         attn_mask=mask)
    return fused_residual(block, y, out)


def _suffix_mask(p: int, s: int, like: torch.Tensor) -> torch.Tensor:
    """[S, P + S] additive mask: every prefix key visible, the suffix's own keys causal."""
    mask = torch.zeros(s, p + s, dtype=like.dtype, device=like.device)
    mask[:, p:] = torch.full((s, s), float("-inf"), dtype=like.dtype, device=like.device).triu(1)
    return mask


def _full_sequences(backbone, prefix, suffix, tokens, deep_prompts, prompt_start, normalize) -> torch.Tensor:
    """The same features through the full G·C sequences (today's path)."""
    g, c = prefix.shape[0], suffix.shape[0]
    x = torch.cat([prefix.unsqueeze(1).expand(-1, c, -1, -1),
                   suffix.to(prefix.dtype).unsqueeze(0).expand(g, -1, -1, -1)], dim=2).flatten(0, 1)
    if deep_prompts is not None and g > 1:  # per-class prompts repeat for every group
        deep_prompts = [d.repeat(g, 1, 1) if d is not None and d.dim() == 3 else d for d in deep_prompts]
    feats = backbone.encode_text_embeddings(x, tokens.repeat(g, 1), deep_prompts, prompt_start, normalize)
    return feats.view(g, c, -1)

