"""Learned per-class rows looked up by class name, with a fallback for classes never trained on.

ZS-LP's class prototypes and TaskRes's residuals are one row per training class. Re-pointed at
other class names (base-to-novel, an exported adapter on new classes), each known name keeps its
learned row and an unknown one gets the method's fallback (its zero-shot text feature, a zero
residual), so a new class is classified as zero-shot CLIP would.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ClassRows(nn.Module):
    def __init__(self, init: torch.Tensor, classnames: Sequence[str]):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone())
        self.trained = list(classnames)  # the classes the rows belong to (set at build time)
        self._index = {c: i for i, c in enumerate(self.trained)}

    def rows(self, classnames: Sequence[str], fallback: torch.Tensor) -> torch.Tensor:
        """[len(classnames), d]: the learned row of each known class, ``fallback``'s otherwise."""
        if list(classnames) == self.trained:
            return self.weight
        index = torch.tensor([self._index.get(c, -1) for c in classnames], device=self.weight.device)
        known = (index >= 0).unsqueeze(-1)
        return torch.where(known, self.weight[index.clamp(min=0)], fallback.to(self.weight))
