"""Dropout with the same distribution as ``nn.Dropout`` and a mask that costs a fraction on the CPU.

torch's CPU dropout draws its mask with ``bernoulli_``: one double-precision uniform and a compare
per element, about 17 ns each on this machine's cores, which made LoRA's dropout (on the LoRA
branch's input of every q/k/v projection, [batch x tokens, width] each) 5 % of a ViT-B/16 step.
``MaskDropout`` keeps an element when a uniform random integer falls below a threshold:

- when the keep probability ``1 - p`` is a multiple of 2^-16 (p = 0.25, CLIP-LoRA's, 0.5, 0.125,
  ...), each element gets 16 random bits cut from full-range 64-bit draws (four elements per
  draw of the generator), and the keep probability is exact;
- otherwise a float32 uniform per element (``torch.rand``: 24 random bits, so the keep
  probability is exact to 2^-24 whatever the input's dtype), kept when ``u < 1 - p``.

The mask it saves for backward is a bool (1 byte per element, not torch's 4), applied by
``torch.where`` in both directions (multiplying by a bool tensor converts it to floats first:
twice the time). Kept elements are scaled by ``1 / (1 - p)`` as torch does. The random stream
is the global generator's, so seeded runs repeat exactly, but it is not the stream
``nn.Dropout`` would draw. On other devices torch's fused kernel is already fast and is used
unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["MaskDropout", "keep_mask", "use_mask_dropout"]


class _KeepScale(torch.autograd.Function):
    """``x * mask * scale`` with the bool mask saved for backward (not a float copy of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.where(mask, x, 0.0).mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0).mul_(ctx.scale), None, None


class MaskDropout(nn.Dropout):
    """``nn.Dropout(p)`` whose CPU training path draws its mask as ``rand < 1 - p``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.p == 1.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = 1.0 - self.p
        return _KeepScale.apply(x, keep_mask(x.shape, keep), 1.0 / keep)


def keep_mask(shape: torch.Size, keep: float) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, each element True with probability ``keep``, independently
    (16 bits per element from 64-bit draws when ``keep`` is a multiple of 2^-16, else a float32
    uniform each)."""
    threshold = keep * 65536
    if threshold != int(threshold):
        return torch.rand(shape, dtype=torch.float32) < keep
    n = shape.numel()
    # full-range int64s: every bit uniform, so each of a word's four int16 views is uniform on
    # [-32768, 32767]; below int(threshold) - 32768 with probability threshold / 65536 = keep
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return (words.view(torch.int16)[:n] < int(threshold) - 32768).view(shape)


def use_mask_dropout(modules: nn.ModuleDict) -> int:
    """Replace each plain ``nn.Dropout`` held in ``modules`` (peft's ``lora_dropout``) by a
    ``MaskDropout`` of the same ``p`` and mode; returns how many were replaced."""
    done = 0
    for key, module in modules.items():
        if type(module) is nn.Dropout:
            new = MaskDropout(module.p)
            new.train(module.training)
            modules[key] = new
            done += 1
    return done
