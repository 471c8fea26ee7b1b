"""What a setting decides: which classes and images are trained on, which sets are evaluated,
and how the results are named. One subclass per file, registered by name (``registry.py``)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

from adapt.data.config import DataConfig
from adapt.data.fewshot import few_shot_splits
from adapt.data.items import DatasetSplits, Item
from adapt.data.multilabel import partial_labels
from adapt.data.registry import build_dataset
from adapt.tasks import get_task

EvalSets = "OrderedDict[str, tuple[list[str], list[Item]]]"


@dataclass
class Plan:
    """A setting applied to a dataset: the training classes and items, the val items, one
    evaluation set per name (class names, items), and the sample to store in the manifest."""

    train: list[Item]
    train_classnames: list[str]
    val: list[Item]
    eval_sets: "OrderedDict[str, tuple[list[str], list[Item]]]"
    sample_train: list[Item] = field(default_factory=list)  # over all classes, before any subset
    sample_val: list[Item] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # recorded in the manifest
    # prompt templates of an evaluation set whose dataset is not the source (cross-dataset targets)
    eval_templates: dict = field(default_factory=dict)
    # several datasets at once (multi_task): the task of every training class, and of every
    # evaluation set; empty: one task, the dataset
    class_tasks: list[str] = field(default_factory=list)
    eval_tasks: dict = field(default_factory=dict)


class Setting:
    name: ClassVar[str] = ""
    # the task kinds (``adapt/tasks/``) whose data this setting knows how to split
    tasks: ClassVar[tuple[str, ...]] = ("single_label",)

    def check(self, cfg: DataConfig) -> None:
        """Recipe-level validation, run when the recipe is read (before anything loads)."""

    def check_method(self, cfg: DataConfig, method: type) -> None:
        """The method (its class) can learn from what this data section gives it; run with the
        recipe's checks, before the backbone loads (unlabelled data: ``Unsupervised``)."""

    def dataset(self, cfg: DataConfig) -> DatasetSplits:
        """The dataset the setting splits: the recipe's (multi_task: its tasks joined)."""
        return build_dataset(cfg)

    def check_dataset(self, cfg: DataConfig, dataset: DatasetSplits) -> None:
        """The loaded dataset suits this setting and the recipe's data section (before any image
        is read or any model time is spent)."""
        if dataset.task not in self.tasks:
            raise ValueError(f"data.setting={self.name} splits {' / '.join(self.tasks)} data, but "
                             f"{dataset.name!r} is {dataset.task} data; use data.setting=all")
        task = get_task(dataset.task)
        if cfg.shots > 0 and not task.samples_shots:
            raise ValueError(f"{dataset.name!r} is {dataset.task} data: it trains on every training image "
                             f"(K images per class is not defined when an image has several classes); "
                             f"set data.shots=0")
        if cfg.partial_labels < 1.0 and not task.partial_labels:
            raise ValueError(f"data.partial_labels={cfg.partial_labels} hides label entries of multi-label "
                             f"data, but {dataset.name!r} is {dataset.task} data; drop data.partial_labels")

    def sample(self, cfg: DataConfig, dataset: DatasetSplits, seed: int) -> tuple[list[Item], list[Item]]:
        """The protocol's K-shot sample over all classes (or the manifest's), with the partial-
        label mask of ``data.partial_labels`` drawn over it (train, then val, one seeded stream)."""
        train, val = few_shot_splits(dataset, cfg.shots, seed, cfg.allow_fewer_shots, cfg.manifest)
        if cfg.partial_labels < 1.0 and cfg.manifest is None:  # a manifest holds its mask already
            import torch

            generator = torch.Generator().manual_seed(seed)
            train = partial_labels(train, cfg.partial_labels, generator)
            val = partial_labels(val, cfg.partial_labels, generator)
        return train, val

    def plan(self, cfg: DataConfig, dataset: DatasetSplits, seed: int) -> Plan:
        train, val = self.sample(cfg, dataset, seed)
        names = list(dataset.classnames)
        return Plan(train, names, val, OrderedDict(test=(names, list(dataset.test))), train, val)

    def prepare(self, data, backbone, device) -> dict:
        """Work that needs the backbone, before the method is built (UPL's pseudo-labels).
        Returns entries for ``results.json``."""
        return {}

    def summarize(self, accs: dict[str, float], metric: str = "acc") -> dict[str, float]:
        """The task's primary metric per evaluation set (``metric``: "acc", "map", ...) -> the
        named metrics of ``results.json``."""
        return {f"test_{metric}": accs["test"]}
