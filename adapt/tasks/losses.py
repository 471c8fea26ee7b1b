"""Multi-label losses of the originals, with −1 = unknown entries left out.

* ``asymmetric_loss`` (DualCoOp ``utils/asymmetric_loss.py:AsymmetricLoss``): with p the
  positive probability — σ(logit) of [N, K] logits, or the softmax over DualCoOp's [N, 2, K]
  (index 1 = positive) — and p_m = min(1 − p + clip, 1) the shifted negative probability,
  ``L = −Σ [ y (1 − p)^γ+ log p + (1 − y) (1 − p_m)^γ− log p_m ]`` over the known entries, the
  focusing weights computed without gradient, logs clamped at ``eps``; a **sum**, as the
  original (its ``loss_w`` recipes scale it). The original's defaults γ− = 4, γ+ = 1, clip 0.05
  (DualCoOp's configs pass γ− = 2).
* ``ranking_loss`` (TaI-DPT ``trainers/utils.py:ranking_loss``): per image, the hinge
  ``max(0, margin − scale·s_pos + scale·s_neg)`` summed over every (positive, negative) pair,
  averaged over the images (TaI-DPT's configs: scale 1, margin 1). Departure: an unknown (−1)
  entry is neither positive nor negative here; the original's ``1 − y`` would weigh it as a
  negative twice (its caption labels never hold −1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["asymmetric_loss", "positive_margin", "positive_probability", "ranking_loss"]


def positive_margin(logits: torch.Tensor) -> torch.Tensor:
    """The score whose sigmoid is the positive probability: [N, K] logits as they are, or
    l+ − l− of DualCoOp's [N, 2, K]. Ranking and thresholding at 0 on it are exact where the
    probability itself rounds to 1 (σ(20) is 1 in float32, and CLIP's 100·cos logits reach it)."""
    return logits[:, 1] - logits[:, 0] if logits.dim() == 3 else logits


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """[N, K] sigmoid probabilities, or the positive softmax of DualCoOp's [N, 2, K] logits."""
    return F.softmax(logits, dim=1)[:, 1] if logits.dim() == 3 else torch.sigmoid(logits)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0,
                    gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-6) -> torch.Tensor:
    if logits.dim() == 3:
        probs = F.softmax(logits, dim=1)
        pos, neg = probs[:, 1], probs[:, 0]
    else:  # σ(−x) = 1 − σ(x), without the cancellation where σ(x) rounds to 1
        pos, neg = torch.sigmoid(logits), torch.sigmoid(-logits)
    known = targets != -1
    pos, neg, y = pos[known], neg[known], targets[known].to(pos.dtype)
    if clip and clip > 0:
        neg = (neg + clip).clamp(max=1)
    loss = y * torch.log(pos.clamp(min=eps)) + (1 - y) * torch.log(neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            pt = pos * y + neg * (1 - y)
            weight = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss = loss * weight
    return -loss.sum()


def ranking_loss(scores: torch.Tensor, targets: torch.Tensor, margin: float = 1.0,
                 scale: float = 1.0) -> torch.Tensor:
    """Pairwise hinge over (positive, negative) classes of each image; unknown (−1) in neither."""
    scores = scale * scores
    pos, neg = (targets == 1).to(scores.dtype), (targets == 0).to(scores.dtype)
    # [N, i, j]: positive i against negative j
    hinge = (margin - scores[:, :, None] + scores[:, None, :]).clamp(min=0)
    return (hinge * pos[:, :, None] * neg[:, None, :]).sum((1, 2)).mean()
