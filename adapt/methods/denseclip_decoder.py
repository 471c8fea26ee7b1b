"""DenseCLIP's trainable modules beside the prompts (``adapt/methods/denseclip.py``), in plain torch:

* ``ContextDecoder``: the text embeddings attend to the image's tokens (DenseCLIP's
  ``models.py:ContextDecoder`` / ``TransformerDecoderLayer`` / ``Attention``: memory
  LN-Linear-LN, text LN-Linear, pre-LN layers of self-attention, cross-attention and a GELU MLP,
  q/k/v without bias, out LN-Linear; Linear weights truncated-normal std 0.02, biases 0);
* ``ViTLevels``: the four ViT token maps made a pyramid at 4x, 2x, 1x and 1/2x the token grid
  (the original's ``fpn1`` … ``fpn4`` for patch 16: GroupNorm(1) and transposed convolutions /
  max pooling; its SyncBatchNorm is a BatchNorm here);
* ``FPN`` and ``FPNHead``: mmsegmentation's FPN neck (1x1 laterals, nearest top-down sums, 3x3
  output convs, no norm or activation, Xavier-uniform init) and its Semantic-FPN head (per level
  ``max(1, log2(stride_i / stride_0))`` 3x3 conv-BN-ReLU blocks, each followed by a 2x bilinear
  upsampling unless the level is the finest, summed at the finest level, Dropout2d then a 1x1
  classifier initialised normal std 0.01), written from their documented behaviour.
Departures here: BatchNorm for the original's SyncBatchNorm (statistics per process under DDP);
none otherwise (the method's own are in ``denseclip.py``'s docstring).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (no bias) and an output projection."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        h = self.heads
        q = self.q_proj(q).view(b, n, h, c // h).transpose(1, 2)
        k = self.k_proj(kv).view(b, kv.shape[1], h, c // h).transpose(1, 2)
        v = self.v_proj(kv).view(b, kv.shape[1], h, c // h).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) * (c // h) ** -0.5).softmax(dim=-1)
        return self.proj_drop(self.proj((weights @ v).transpose(1, 2).reshape(b, n, c)))


class _DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn = _Attention(dim, heads, dropout)
        self.cross_attn = _Attention(dim, heads, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """Dec(t, V): text embeddings t [B, K, C] updated by attending to visual context V [B, N, C]."""

    def __init__(self, dim: int, width: int = 256, heads: int = 4, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.decoder = nn.ModuleList(_DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)


class ViTLevels(nn.Module):
    """Four token maps [B, W, h, w] -> maps at 4h, 2h, h and h/2 (strides 4, 8, 16, 32 for a
    patch-16 ViT): the original's patch-16 ``fpn1`` … ``fpn4``, applied to any patch size."""

    def __init__(self, width: int):
        super().__init__()
        up = lambda: nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)  # noqa: E731
        gn = lambda: nn.GroupNorm(1, width)  # noqa: E731
        self.ops = nn.ModuleList([
            nn.Sequential(gn(), up(), nn.BatchNorm2d(width), nn.GELU(), up()),
            nn.Sequential(gn(), up()),
            gn(),
            nn.Sequential(gn(), nn.MaxPool2d(kernel_size=2, stride=2)),
        ])

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip(self.ops, maps)]


class FPN(nn.Module):
    """mmseg's FPN neck with as many outputs as inputs (no extra levels)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNHead(nn.Module):
    """mmseg's Semantic-FPN decode head: logits [B, K, H0, W0] at the finest level's size."""

    def __init__(self, num_classes: int, in_channels: Sequence[int] = (256,) * 4,
                 strides: Sequence[int] = (4, 8, 16, 32), channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for i, (cin, stride) in enumerate(zip(in_channels, strides)):
            blocks = []
            for k in range(max(1, int(math.log2(stride) - math.log2(strides[0])))):
                blocks.append(_conv_bn_relu(cin if k == 0 else channels, channels))
                if stride != strides[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](inputs[0])
        for head, x in zip(self.scale_heads[1:], inputs[1:]):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))
