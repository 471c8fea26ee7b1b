"""Several classes per image: multi-hot targets with −1 = unknown (partial labels), the
asymmetric loss by default, mAP as the originals compute it plus CP/CR/CF1/OP/OR/OF1 at 0.5 and
top-k P/R/F1 (``adapt/tasks/metrics.py``, ``losses.py``)."""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.utilities import dim_zero_cat

from adapt.tasks.base import Task, register_task
from adapt.tasks.losses import asymmetric_loss, positive_probability
from adapt.tasks.metrics import mean_average_precision, threshold_scores, topk_scores


class MultiLabelEvaluator(Metric):
    """Keeps a split's positive probabilities and targets (gathered across DDP processes) and
    computes every multi-label metric on the whole split."""

    def __init__(self, threshold: float = 0.5, k: int = 3):
        super().__init__()
        self.threshold, self.k = threshold, k
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(positive_probability(logits.float()).detach())
        self.targets.append(targets.detach().to(torch.int8))

    def compute(self) -> dict[str, float]:
        probs, targets = dim_zero_cat(self.probs), dim_zero_cat(self.targets)
        percent = {"map": mean_average_precision(probs, targets),
                   **threshold_scores(probs, targets, self.threshold), **topk_scores(probs, targets, self.k)}
        return {name: value / 100.0 for name, value in percent.items()}


@register_task("multi_label")
class MultiLabel(Task):
    primary = "map"
    target = "a multi-hot vector per image (1 present, 0 absent, -1 unknown)"

    def loss(self, logits, targets):
        return asymmetric_loss(logits, targets)

    def evaluator(self, num_classes: int) -> Metric:
        return MultiLabelEvaluator()

    def train_metric(self, num_classes: int) -> Metric:
        # torchmetrics' macro AP with the unknown entries ignored: a running view for the
        # progress bar; the reported mAP is the evaluator's (the originals' formula)
        return MultilabelAveragePrecision(num_labels=num_classes, average="macro", ignore_index=-1)

    def scores(self, logits):
        return positive_probability(logits)
