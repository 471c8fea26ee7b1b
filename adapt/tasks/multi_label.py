"""Several classes per image: multi-hot targets with −1 = unknown (partial labels), the
asymmetric loss by default, mAP as the originals compute it plus CP/CR/CF1/OP/OR/OF1 at 0.5 and
top-k P/R/F1 (``adapt/tasks/metrics.py``, ``losses.py``)."""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.utilities import dim_zero_cat

from adapt.tasks.base import Task, register_task, top_rows
from adapt.tasks.losses import asymmetric_loss, positive_margin, positive_probability
from adapt.tasks.metrics import mean_average_precision, threshold_scores, topk_scores


class MultiLabelEvaluator(Metric):
    """Keeps a split's positive margins (``positive_margin``: σ of it is the probability) and
    targets, gathered across DDP processes, and computes every multi-label metric on the whole
    split: mAP and top-k rank the margins (the probabilities' order, without float32's ties at
    1), the threshold scores compare the probability with ``threshold`` exactly (as the logit)."""

    def __init__(self, threshold: float = 0.5, k: int = 3):
        super().__init__()
        self.threshold, self.k = threshold, k
        self.add_state("margins", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.margins.append(positive_margin(logits.float()).detach())
        self.targets.append(targets.detach().to(torch.int8))

    def compute(self) -> dict[str, float]:
        margins, targets = dim_zero_cat(self.margins), dim_zero_cat(self.targets)
        logit = math.log(self.threshold / (1 - self.threshold))  # p > threshold <=> margin > logit
        percent = {"map": mean_average_precision(margins, targets),
                   **threshold_scores(margins, targets, logit), **topk_scores(margins, targets, self.k)}
        return {name: value / 100.0 for name, value in percent.items()}


@register_task("multi_label")
class MultiLabel(Task):
    primary = "map"
    target = "a multi-hot vector per image (1 present, 0 absent, -1 unknown)"
    samples_shots = False
    partial_labels = True

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

    def probabilities(self, logits):
        # each class on its own (σ of the positive margin): several can be present at once
        return positive_probability(logits.float())

    def predictions(self, logits, classnames, k, sizes):
        probs = self.probabilities(logits)
        rows = top_rows(probs, classnames, k, "prob")
        for row, p in zip(rows, probs):  # every class above the task's threshold of 0.5
            row["present"] = ";".join(classnames[i] for i in (p > 0.5).nonzero().flatten().tolist())
        return rows, None
