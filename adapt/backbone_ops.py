"""Tensor helpers the backbone wrapper and its passes share (the dense outputs, the shared
prompt prefix): projections, prompt slots, positional-embedding resampling. They know nothing
of open_clip's modules, so the passes import them without importing the wrapper."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batched", "mask_patches", "project", "replace_slots", "resample_positions", "slice_batch"]


def resample_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A [1 + S*S, W] positional embedding (class / pooled position first) resampled to a patch
    grid ``grid``: bicubic, ``align_corners=False``, the first position kept."""
    side = round((pos.shape[0] - 1) ** 0.5)
    if grid == (side, side):
        return pos
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.to(pos.dtype).flatten(2)[0].t()])


def project(x: torch.Tensor, proj) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def batched(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


def slice_batch(p, lo: int, hi: int, n: int):
    """Images ``lo:hi`` of a prompt given per image ([n, m, W] for a batch of n), or the prompt
    itself when it is shared ([m, W]) or absent; a list of them (deep prompts) element-wise."""
    if isinstance(p, (list, tuple)):
        return [slice_batch(q, lo, hi, n) for q in p]
    return p[lo:hi] if p is not None and p.dim() == 3 and p.shape[0] == n else p


def replace_slots(x: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    prompt = batched(prompt, x.shape[0]).to(x.dtype)
    end = start + prompt.shape[1]
    return torch.cat([x[:, :start], prompt, x[:, end:]], dim=1)


def mask_patches(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Patch embeddings ``x`` [B, HW, W] with the rows where ``mask`` [B, HW] is true replaced
    by ``token`` [W] (MUST's and SimMIM's mask token, entering before the positional embedding);
    the token's gradient is the sum over the rows it fills."""
    if token is None:
        raise ValueError("a patch_mask needs the mask_token [W] that replaces the masked patches")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"patch_mask has shape {tuple(mask.shape)}, but the images give {x.shape[0]} x "
                         f"{x.shape[1]} patches: one flag per patch of the grid, row by row")
    if token.shape[-1] != x.shape[-1] or token.numel() != x.shape[-1]:
        raise ValueError(f"mask_token has shape {tuple(token.shape)}; the patch embeddings are {x.shape[-1]}-wide")
    return torch.where(mask.to(torch.bool)[..., None], token.reshape(-1).to(x.dtype), x)
