"""Hierarchical metrics of single-label data with a class tree (``data.hierarchy``), as ProTeCt
reports them (gina9726/ProTeCt ``engine.py``, ``metrics.py``, ``test.py``):

* ``acc``: leaf accuracy, the argmax over the classes only;
* ``hca`` (hierarchical consistency accuracy): an image counts when its class is right *and*,
  at every internal node on its path (the root included), the argmax over that node's children
  is the child it lies under;
* ``mta`` (mean tree-cut accuracy): the mean over a fixed set of tree cuts of the accuracy of
  the argmax over each cut's labels, the target being the label that covers the class.

Every one is read from one logit matrix over ``TreeView.names`` (classes first, then internal
nodes): for a method whose class logits do not depend on which other names are in its list
(CoOp's cosine logits), the argmax over a subset of its columns is the prediction of the method
pointed at that subset alone, which is how the original evaluates each node and each cut.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric

from adapt.tasks.hierarchy import TreeView


class HierarchicalAccuracy(Metric):
    """{"acc", "hca", "mta"} as fractions of 1, summed per process and synchronised under DDP."""

    def __init__(self, view: TreeView, cuts):
        super().__init__()
        self.n_classes, self.n_names = view.n_classes, len(view.names)
        self.node_children = [torch.tensor(c, dtype=torch.long) for c in view.children]
        self.register_buffer("sublabels", view.sublabels, persistent=False)
        self.cut_labels = [c.labels for c in cuts]
        self.register_buffer("cut_mapping", torch.stack([c.mapping for c in cuts]) if cuts else
                             torch.zeros(0, view.n_classes, dtype=torch.long), persistent=False)
        # counts (integers: exact under any number of processes)
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("leaf", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("consistent", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("cut_correct", default=torch.zeros(len(cuts), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.shape[-1] != self.n_names:
            raise ValueError(f"hierarchical metrics read logits over the tree's {self.n_names} names "
                             f"(classes, then internal nodes), got {logits.shape[-1]} columns")
        logits, targets = logits.float(), targets.long()
        right = logits[:, :self.n_classes].argmax(-1) == targets
        self.leaf += right.sum()
        consistent = right.clone()
        sub = self.sublabels.to(targets.device)[targets]  # [B, I]
        for i, kids in enumerate(self.node_children):
            under = sub[:, i] >= 0
            pick = logits[:, kids.to(logits.device)].argmax(-1)
            consistent &= (pick == sub[:, i]) | ~under
        self.consistent += consistent.sum()
        mapping = self.cut_mapping.to(targets.device)
        for c, labels in enumerate(self.cut_labels):
            pick = logits[:, labels.to(logits.device)].argmax(-1)
            self.cut_correct[c] += (pick == mapping[c][targets]).sum()
        self.total += targets.numel()

    def compute(self) -> dict[str, float]:
        n = max(float(self.total), 1.0)
        out = {"acc": float(self.leaf) / n, "hca": float(self.consistent) / n}
        if len(self.cut_labels):
            out["mta"] = float(self.cut_correct.double().mean()) / n
        return out
