"""One class per image (today's every dataset): cross-entropy, top-1 accuracy. With a class tree
(``data.hierarchy``, adapt/tasks/hierarchy.py) evaluation also scores the tree's internal nodes by
name and reports ProTeCt's hierarchical consistency (``hca``) and mean tree-cut (``mta``)
accuracies beside the leaf accuracy; training stays cross-entropy over the classes."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from adapt.tasks.hierarchy import ClassTree
from adapt.tasks.base import Task, register_task
from adapt.tasks.hierarchy_metrics import HierarchicalAccuracy


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
    data_options = ("hierarchy",)

    def __init__(self, hierarchy: Optional[str] = None):
        """``hierarchy``: a class tree file (read and checked here, before anything loads)."""
        self.tree = ClassTree.load(hierarchy) if hierarchy else None

    def check_classes(self, classnames) -> None:
        if self.tree is not None:
            self.tree.check_classes(classnames)

    def evaluation_classes(self, classnames) -> list[str]:
        return list(classnames) if self.tree is None else self.tree.over(classnames).names

    def evaluator_for(self, names) -> Metric:
        if self.tree is None:
            return self.evaluator(len(names))
        view = self.tree.over(names)
        if view.names != list(names):
            raise ValueError(f"hierarchical evaluation needs logits over the tree's names {view.names[:4]}..., "
                             f"got {list(names)[:4]}...")
        return HierarchicalAccuracy(view, view.evaluation_cuts())

    def loss(self, logits, targets):
        return F.cross_entropy(logits, targets)

    def evaluator(self, num_classes: int) -> Metric:
        return _Accuracy(num_classes)

    def train_metric(self, num_classes: int) -> Metric:
        # -1 marks an unlabelled training image (data.setting=unsupervised, shots 0): the running
        # accuracy counts the labelled ones only (none: it stays 0)
        return MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=-1)


def task_ids(class_tasks) -> torch.Tensor:
    """The task index of every class, from the task name of every class."""
    order = {name: i for i, name in enumerate(dict.fromkeys(class_tasks))}
    return torch.tensor([order[name] for name in class_tasks], dtype=torch.long)


def own_task_logits(logits: torch.Tensor, labels: torch.Tensor, class_task: torch.Tensor) -> torch.Tensor:
    """[B, K] logits with every class outside the labelled class's task at -inf: a softmax (a
    cross-entropy) over them is the one over the task's own classes, as SoftCPT's multi-task
    loss slices them. Unlabelled images (-1) keep every class."""
    own = class_task[labels.clamp(min=0)]
    outside = class_task[None, :] != own[:, None]
    outside &= (labels >= 0)[:, None]
    return logits.masked_fill(outside, float("-inf"))
