"""One class per image (today's every dataset): cross-entropy, top-1 accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from adapt.tasks.base import Task, register_task


class _Accuracy(Metric):
    """Top-1 accuracy as {"acc": fraction} (torchmetrics' micro accuracy underneath)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.acc.update(logits, targets)

    def compute(self) -> dict[str, float]:
        return {"acc": float(self.acc.compute())}

    def reset(self) -> None:
        super().reset()
        self.acc.reset()


@register_task("single_label")
class SingleLabel(Task):
    primary = "acc"
    target = "one class index per image"

    def loss(self, logits, targets):
        return F.cross_entropy(logits, targets)

    def evaluator(self, num_classes: int) -> Metric:
        return _Accuracy(num_classes)

    def train_metric(self, num_classes: int) -> Metric:
        return MulticlassAccuracy(num_classes=num_classes, average="micro")
