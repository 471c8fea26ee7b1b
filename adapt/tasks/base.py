"""What a label is: a task kind owns the target's form, the default loss, the metrics and their
names. Registered by short name like methods and settings; the engine asks the task and never
branches on its name."""
from __future__ import annotations

import difflib
from typing import ClassVar

import torch
from torchmetrics import Metric

__all__ = ["Task", "get_task", "list_tasks", "register_task"]

_TASKS: dict[str, type] = {}


class Task:
    name: ClassVar[str] = ""
    # the metric that names a split's result (``test_<primary>``) and ranks runs
    primary: ClassVar[str] = ""
    # what one target is, in a few words (for messages and `adapt tasks`)
    target: ClassVar[str] = ""
    # K images per class is defined (single-label); else a run trains on every training image
    samples_shots: ClassVar[bool] = True
    # label entries can be unknown (-1) and ``data.partial_labels`` may hide some
    partial_labels: ClassVar[bool] = False
    # the logits' trailing grid dimensions: [B, K] scores (0), or [B, K, h, w] maps (2)
    logit_grid: ClassVar[int] = 0
    # its targets can be stored beside cached frozen features (a class index, a multi-hot row)
    cacheable: ClassVar[bool] = True
    # How one item becomes (x, target), ``read(image, label, root, transform)``, and how a batch
    # of them collates; None: the data path's own (the transform on the image, the label as its
    # tensor; torch's default collation). A task whose target is a file (a label map) sets them.
    read = None
    collate = None
    # ``train_transform(image_size, mean, std)`` / ``test_transform(...)``: None for the CoOp
    # protocol's (adapt/data/transforms.py); a task whose targets move with the pixels sets its own
    train_transform = None
    test_transform = None
    # the ``data`` fields that configure this task kind (``options_from``); set for data of
    # another kind, they are refused rather than ignored
    data_options: ClassVar[tuple[str, ...]] = ()
    # those of them that change what is predicted, not only how it is scored (segmentation's
    # sliding window): an exported adapter records them (``options``), so ``adapt predict``
    # infers as the run evaluated
    recorded_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def options_from(cls, data) -> dict:
        """This task's constructor options from a ``data`` section; a field that configures
        another task kind only, set here, is an error naming it."""
        for other in _TASKS.values():
            for field in other.data_options:
                if field not in cls.data_options and getattr(data, field, None) is not None:
                    raise ValueError(f"data.{field} configures {other.name} data, and this dataset's labels "
                                     f"are {cls.name}; remove data.{field}")
        return {field: _plain(getattr(data, field)) for field in cls.data_options
                if getattr(data, field, None) is not None}

    def options(self) -> dict:
        """The ``recorded_options`` this task was built with (those set), as plain values."""
        values = {name: _plain(getattr(self, name)) for name in self.recorded_options
                  if getattr(self, name, None) is not None}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}

    def check_classes(self, classnames) -> None:
        """Refuse, before anything loads, task options that do not fit the dataset's classes
        (every class the run meets); the default has none."""

    def evaluation_classes(self, classnames) -> list[str]:
        """The names the method is pointed at to evaluate a split of these classes: the classes
        themselves, or more (a class tree's internal nodes, for hierarchical metrics); column
        ``c < len(classnames)`` of the logits stays class ``c``."""
        return list(classnames)

    def evaluator_for(self, names) -> Metric:
        """The evaluator of a split whose logits are over ``names`` (``evaluation_classes``)."""
        return self.evaluator(len(names))

    def infer(self, predict, x: torch.Tensor) -> torch.Tensor:
        """A split's evaluation logits of a batch from the method's ``predict``: one call on
        the batch (segmentation may slide a window instead)."""
        return predict(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The default training loss of a method on this task."""
        raise NotImplementedError

    def evaluator(self, num_classes: int) -> Metric:
        """A torchmetrics ``Metric`` accumulating a split's logits and targets (synchronised
        across DDP processes); ``compute()`` returns {metric name: value as a fraction of 1},
        ``primary`` among them (``results.json`` holds them ×100)."""
        raise NotImplementedError

    def train_metric(self, num_classes: int) -> Metric:
        """The running training metric, a scalar torchmetrics ``Metric`` of ``scores(logits)``
        (logged as ``train/<primary>``)."""
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``train_metric`` reads from a method's logits."""
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, K] per-class probabilities of a batch's logits (``adapt predict``): a softmax over
        the classes for one label per image."""
        return logits.float().softmax(dim=-1)

    def predictions(self, logits: torch.Tensor, classnames, k: int, sizes) -> tuple[list[dict], list | None]:
        """``adapt predict``'s rows of a batch, ``label_i`` / ``prob_i`` of the ``k`` most
        probable classes, and per-image label maps (None: the task has none). ``sizes``: each
        original image's (height, width)."""
        return top_rows(self.probabilities(logits), classnames, k, "prob"), None


def top_rows(values: torch.Tensor, classnames, k: int, what: str) -> list[dict]:
    """Per row of [B, K] ``values``: label_1, <what>_1, ... for its ``k`` largest, in order."""
    top = values.topk(max(1, min(k, values.shape[-1])), dim=-1)
    rows = []
    for vals, idx in zip(top.values.tolist(), top.indices.tolist()):
        row = {}
        for rank, (v, i) in enumerate(zip(vals, idx), start=1):
            row[f"label_{rank}"], row[f"{what}_{rank}"] = classnames[i], round(v, 6)
        rows.append(row)
    return rows


def _plain(value):
    """A config value as plain Python (an OmegaConf list as a list), for hyper-parameters."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def register_task(name: str):
    def wrap(cls):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return wrap


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **options) -> Task:
    """The task kind ``name``, built with ``options`` (``Task.options_from`` a data section)."""
    if name not in _TASKS:
        close = difflib.get_close_matches(name, _TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown task {name!r}.{hint} Registered: {', '.join(list_tasks())}")
    return _TASKS[name](**options)
