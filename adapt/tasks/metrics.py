"""Multi-label metrics as DualCoOp's and TaI-DPT's code computes them (torch, on whole splits).

* ``mean_average_precision``: per class, the non-interpolated AP of the scores ranked high to
  low, ``Σ_{i: y_i = 1} precision@i / (positives + 1e-8)``, averaged over classes ×100
  (DualCoOp ``utils/helper.py:mAP``; TaI-DPT's evaluator the same). Only targets equal to 1 are
  positives: unknown (−1) and VOC's difficult objects count as negatives there, as both originals
  treat them; ``ignore_unknown=True`` leaves the −1 entries out of each class's ranking instead.
* ``threshold_scores``: CP / CR / CF1 (per class, then averaged; a class with no true positive
  scores 0) and OP / OR / OF1 (over all entries) at a probability threshold, 0.5 by default
  (DualCoOp ``utils/validations.py:validate``).
* ``topk_scores``: precision / recall / F1 of each image's k highest scores against its positive
  labels, pooled over the split (DualCoOp ``utils/helper.py:calc_F1``, the zero-shot split's).
"""
from __future__ import annotations

import torch

__all__ = ["mean_average_precision", "threshold_scores", "topk_scores"]


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, ignore_unknown: bool = False) -> float:
    """mAP ×100 of ``scores`` [N, K] against ``targets`` [N, K] in {1, 0, −1}."""
    scores, targets = scores.double(), targets.double()
    aps = []
    for k in range(scores.shape[1]):
        s, t = scores[:, k], targets[:, k]
        if ignore_unknown:
            keep = t != -1
            s, t = s[keep], t[keep]
        order = torch.argsort(s, descending=True, stable=True)
        hit = (t[order] == 1).double()
        precision_at = hit.cumsum(0) / torch.arange(1, len(hit) + 1, dtype=torch.float64)
        aps.append(float((precision_at * hit).sum() / (hit.sum() + 1e-8)))
    return 100.0 * sum(aps) / max(len(aps), 1)


def threshold_scores(probs: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (×100) of ``probs`` > ``threshold`` against ``targets`` == 1."""
    pred, pos = probs > threshold, targets == 1
    tp = (pred & pos).sum(0).double()
    fp = (pred & ~pos).sum(0).double()
    fn = (~pred & pos).sum(0).double()
    has = tp > 0
    p_c = torch.where(has, 100.0 * tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
    r_c = torch.where(has, 100.0 * tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
    f_c = torch.where(has, 2 * p_c * r_c / (p_c + r_c).clamp_min(1e-12), torch.zeros_like(tp))
    p_o = 100.0 * float(tp.sum()) / max(float((tp + fp).sum()), 1e-12)
    r_o = 100.0 * float(tp.sum()) / max(float((tp + fn).sum()), 1e-12)
    f_o = 2 * p_o * r_o / (p_o + r_o) if p_o + r_o > 0 else 0.0
    return {"cp": float(p_c.mean()), "cr": float(r_c.mean()), "cf1": float(f_c.mean()),
            "op": p_o, "or": r_o, "of1": f_o}


def topk_scores(scores: torch.Tensor, targets: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Precision, recall, F1 (×100) of the top-``k`` classes per image, pooled over the split."""
    k = min(k, scores.shape[1])
    top = torch.zeros_like(targets, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    pos = targets == 1
    tp = float((top & pos).sum())
    precision = tp / max(float(top.sum()), 1e-12)
    recall = tp / max(float(pos.sum()), 1e-12)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {f"p@{k}": 100.0 * precision, f"r@{k}": 100.0 * recall, f"f1@{k}": 100.0 * f1}
