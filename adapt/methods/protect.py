"""ProTeCt (Wu, Ho & Vasconcelos, CVPR 2024): prompt tuning for taxonomic open-set classification.

A prompt learner (CoOp: ``protect``; MaPLe: ``protect_maple``) trained so that its prompts also
classify at every level of a class tree (``data.hierarchy``, adapt/tasks/hierarchy.py)::

    L = L_DTL + λ · L_NCE

* ``L_DTL`` (dynamic tree-cut loss): each step draws a tree cut, every internal node collapsed
  with probability ``collapse`` (the root never; a node under a collapsed one is collapsed), and
  takes the cross-entropy over the cut's labels, each image's target being the label that covers
  its class. With nothing collapsed the cut is the classes and L_DTL is the base method's CE.
* ``L_NCE`` (node-centric loss): at every internal node, the root included, the images whose
  class lies under it are classified among its children; the mean over the batch's images under
  the node, then over the nodes that have any.

Every label is a node name read through the same learned prompt ("X X ... warm colour."). One
forward pass scores all of the tree's names (``TreeView.names``: the classes first, then the
internal nodes); each cut and each node reads its columns. Prediction is the base method's over
the classes; with ``data.hierarchy`` evaluation also reports ``hca`` and ``mta``
(adapt/tasks/hierarchy_metrics.py), for this method and for any other prompt method alike.

Reference: gina9726/ProTeCt at 2aa2d7b, ``engine.py`` (``train_one_epoch``: the node loop and
the random cut), ``models/treecut_generator.py``, ``loader/hierdata.py`` / ``treelibs.py``
(sublabels, dependence, codewords), configs ``<dataset>/few_shot/16_shot/{CoOp,MaPLe}+ProTeCt.yml``.
tests/test_protect.py runs the original's ``train_one_epoch`` and ``eval_one_epoch`` on a
stand-in model (``ADAPT_PROTECT_REPO``): the loss, its gradient, the cut's label set and HCA
agree with this module's to fp32 round-off.

Departures, each deliberate:

* One forward pass over every name instead of the original's pass per internal node and one per
  cut. The image features do not depend on the class list (CoOp's are frozen, MaPLe's vision
  prompts come from the context, not the names) and each text feature depends only on its own
  name, so every logit is the one the original computes; the original's per-node passes differ
  only in cost.
* The cut is drawn from the run's seeded torch generator, not ``F.dropout`` on CUDA: the same
  distribution (each internal node kept with probability 1 − ``collapse``), another stream.
* The original steps its cosine schedule every iteration against ``T_max = max_epoch`` epochs,
  so its learning rate oscillates with a period of 2·max_epoch iterations and its one warm-up
  "epoch" lasts one iteration. adapt's schedule is per epoch (CoOp's protocol): the schedule the
  configs describe, not the one they run.
* MTA is measured on cuts drawn by ``TreeView.evaluation_cuts`` (25 distinct cuts, 5 at each of
  the collapse rates 0.9, 0.7, 0.5, 0.3, 0.1, seed 0), the protocol of the original's
  ``sample_treecuts.py --multi``; the original's pickled cut files are not read (a pickle is
  code), so on its datasets the 25 cuts are others than its published ones.
* The class trees are JSON files (names, not the original's pickled ``treelibs.Tree``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from adapt.tasks.hierarchy import TreeView
from adapt.methods.base import MethodOutput, as_output
from adapt.methods.coop import CoOp, CoOpConfig
from adapt.methods.maple import MaPLe, MaPLeConfig
from adapt.methods.registry import register_method

TREE_FILE = ("a class tree: a JSON file mapping each internal node to its children, the leaves being the "
             "classes (adapt/tasks/hierarchy.py), e.g. data.hierarchy=adapt/data/world/world_colour_tree.json "
             "for world_colour")


def check_tree_options(lam: float, collapse: float) -> None:
    if lam < 0:
        raise ValueError(f"lam (the node loss's weight) must be >= 0, got {lam}")
    if not 0.0 <= collapse < 1.0:
        raise ValueError(f"collapse (each internal node's probability of being collapsed in a training "
                         f"cut) must be in [0, 1), got {collapse}")


def tree_cut_loss(logits: torch.Tensor, labels: torch.Tensor, view: TreeView, collapse: float) -> torch.Tensor:
    """L_DTL: cross-entropy over a random cut's labels (``logits`` over ``view.names``)."""
    cut = view.random_cut(collapse)
    return F.cross_entropy(logits[:, cut.labels.to(logits.device)], cut.mapping.to(labels.device)[labels])


def node_loss(logits: torch.Tensor, labels: torch.Tensor, view: TreeView) -> torch.Tensor:
    """L_NCE: per internal node, the CE of its images among its children; the mean over nodes."""
    sub = view.sublabels.to(labels.device)[labels]  # [B, I]: the child each image lies under
    terms = []
    for i, kids in enumerate(view.children):
        under = sub[:, i] >= 0
        if bool(under.any()):
            cols = torch.tensor(kids, device=logits.device)
            terms.append(F.cross_entropy(logits[under][:, cols], sub[under, i]))
    return torch.stack(terms).mean()


class TreePrompts:
    """The ProTeCt mixin over a prompt method whose ``forward`` scores ``self.classnames``: its
    prompts are built over the tree's names (the classes, then the internal nodes), ``forward``
    returns the class columns and the loss reads all of them."""

    requires_data = {"hierarchy": TREE_FILE}

    def rebuild_classes(self) -> None:
        self._built = None
        self._view: Optional[TreeView] = None
        self._scored_names()

    def _scored_names(self) -> None:
        """Build the base method's prompts over the tree's names of the current classes; done
        when the classes or the task change (the task, and so the tree, is set after
        ``__init__``), so every call site may ask."""
        tree = getattr(self.task, "tree", None)
        key = (tuple(self.classnames), id(tree))
        if self._built == key:
            return
        self._view = tree.over(self.classnames) if tree is not None else None
        classes = self.classnames
        self.classnames = self._view.names if self._view is not None else classes
        try:
            super().rebuild_classes()
        finally:
            self.classnames = classes
        self._text_cache = None
        self._built = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._scored_names()
        return super().forward(x)[..., :len(self.classnames)]

    def output(self, x: torch.Tensor) -> MethodOutput:
        self._scored_names()
        if self._view is None:
            raise ValueError(f"{self.name} trains on a class tree and this data has none: set data.hierarchy "
                             f"to {TREE_FILE}")
        scores = super().forward(x)
        return MethodOutput(scores[:, :len(self.classnames)], {"tree_logits": scores})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        scores = out.tensors["tree_logits"]
        dtl = tree_cut_loss(scores, labels, self._view, self.config.collapse)
        if self.config.lam == 0:
            out.scalars.update(dtl=dtl.detach())
            return dtl
        nce = node_loss(scores, labels, self._view)
        out.scalars.update(dtl=dtl.detach(), nce=nce.detach())
        return dtl + self.config.lam * nce


@dataclass
class ProTeCtConfig(CoOpConfig):
    # configs/imagenet/few_shot/16_shot/CoOp+ProTeCt.yml: n_ctx 16, random init, shared context
    # λ, the node-centric loss's weight (loss.lambda: 1 on ImageNet, 0.5 on SUN and CIFAR-100)
    lam: float = 1.0
    # each internal node's probability of being collapsed in a training cut (treecut_generator.dropout_rate)
    collapse: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.csc:
            raise ValueError("csc=true learns one context per class, and ProTeCt reads every node name of the "
                             "tree through the prompt; set csc=false")
        check_tree_options(self.lam, self.collapse)


@register_method("protect")
class ProTeCt(TreePrompts, CoOp):
    Config = ProTeCtConfig
    trainable_kind = "text context"
    supports_feature_cache = True


@dataclass
class ProTeCtMaPLeConfig(MaPLeConfig):
    # configs/imagenet/few_shot/16_shot/MaPLe+ProTeCt.yml: n_ctx 2, "a photo of a", prompt_depth 3
    depth: int = 3
    lam: float = 1.0
    collapse: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_tree_options(self.lam, self.collapse)


@register_method("protect_maple")
class ProTeCtMaPLe(TreePrompts, MaPLe):
    Config = ProTeCtMaPLeConfig
    trainable_kind = "deep text prompts + vision couplings"
