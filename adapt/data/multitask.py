"""Several datasets trained as one (``data.setting: multi_task``): the tasks of a recipe and the
joint dataset they form.

``data.dataset`` (with ``data.root``, ``data.split_file``, ``data.templates``) is the first task;
``data.tasks`` lists the others, each a dataset name or a mapping ``{dataset, root, split_file,
templates, name}``. The joint dataset concatenates the tasks' class lists in recipe order (task
``t``'s class ``c`` is joint class ``offset[t] + c``) and their items, with absolute paths (each
task keeps its own root). MVLPT and SoftCPT both concatenate their datasets this way; what they
differ in is the classifier, which ``data.multi_task.classifier`` names:

- ``union``: one softmax over every task's classes (MVLPT's code);
- ``per_task``: an image is scored against its own task's classes only (SoftCPT's multi-task
  cross-entropy, MVLPT's ``MULTITASK_LABEL_PERTASK`` with -inf instead of its 0).

The task of an image is a function of its joint label (``class_tasks``), so batches keep their
``(x, label)`` shape and the feature cache its keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapt.data.items import DatasetSplits, Item, clean_classname

CLASSIFIERS = ("union", "per_task")
TASK_KEYS = ("dataset", "root", "split_file", "templates", "name")


@dataclass
class MultiTaskConfig:
    # "union": one softmax over all tasks' classes (MVLPT); "per_task": each image against its
    # own task's classes (SoftCPT)
    classifier: str = "union"
    # train on the base half of every task's classes and evaluate each task's base and novel
    # halves (CoCoOp's split, per task)
    base2novel: bool = False

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"data.multi_task.classifier={self.classifier!r} is not one of "
                             f"{', '.join(CLASSIFIERS)}")


def dataset_entry(entry: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """A recipe's dataset entry (a cross-dataset target, a task): a dataset name or a mapping of
    ``keys``, ``dataset`` required."""
    spec: dict[str, Any] = {"dataset": entry} if isinstance(entry, str) else dict(entry)
    bad = sorted(set(spec) - set(keys))
    if "dataset" not in spec or bad:
        raise ValueError(f"{where} = {entry!r}: give a dataset name or a mapping with keys "
                         f"{', '.join(keys)} (dataset required)")
    return spec


@dataclass
class TaskSpec:
    """One task of a multi-task recipe: its name (results are reported under it) and the data
    section that loads it."""

    name: str
    data: Any  # a DataConfig


def task_specs(cfg) -> list[TaskSpec]:
    """The recipe's tasks in order: ``data.dataset`` first, then each ``data.tasks`` entry (the
    data section's other keys carried over). Names must differ: they name the results."""
    specs = [TaskSpec(cfg.dataset, dataclasses.replace(cfg, tasks=[], setting="all", manifest=None))]
    for i, entry in enumerate(cfg.tasks or []):
        spec = dataset_entry(entry, TASK_KEYS, f"data.tasks[{i}]")
        data = dataclasses.replace(cfg, dataset=spec["dataset"], root=spec.get("root", cfg.root),
                                   split_file=spec.get("split_file"), templates=spec.get("templates"),
                                   tasks=[], setting="all", manifest=None)
        specs.append(TaskSpec(str(spec.get("name", spec["dataset"])), data))
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name.endswith(("_base", "_novel")):  # they would read as a task's base / novel half
            raise ValueError(f"task name {spec.name!r} ends in _base or _novel, which name a task's "
                             f"halves in the results; rename it: {{dataset: {spec.data.dataset}, name: ...}}")
        if spec.name in seen:
            raise ValueError(f"two tasks are named {spec.name!r} (entries {seen[spec.name]} and {i} of "
                             f"[data.dataset] + data.tasks); give one of them a name: {{dataset: "
                             f"{spec.data.dataset}, name: ...}}")
        seen[spec.name] = i
    return specs


@dataclass
class JointDataset:
    """The tasks' datasets and the joint one they form."""

    names: list[str]  # task names, in order
    datasets: list[DatasetSplits]
    joint: DatasetSplits
    offsets: list[int] = field(default_factory=list)  # first joint class of each task

    @property
    def class_tasks(self) -> list[str]:
        """The task of every joint class."""
        return [name for name, ds in zip(self.names, self.datasets) for _ in ds.classnames]

    def joint_items(self, task: int, items: list[Item]) -> list[Item]:
        """A task's items as joint items: absolute paths, labels moved by the task's offset."""
        root = Path(self.datasets[task].root).expanduser().resolve()
        return [Item(str(root / it.path), it.label + self.offsets[task]) for it in items]

    def local_items(self, task: int, items: list[Item]) -> list[Item]:
        """A task's items for its own evaluation: absolute paths, the task's own labels."""
        root = Path(self.datasets[task].root).expanduser().resolve()
        return [Item(str(root / it.path), it.label) for it in items]


def join_tasks(names: list[str], datasets: list[DatasetSplits], classifier: str) -> JointDataset:
    """Concatenate single-label datasets into one; under a union classifier two tasks may not
    share a class name (one softmax could not tell them apart)."""
    for name, ds in zip(names, datasets):
        if ds.task != "single_label":
            raise ValueError(f"data.setting=multi_task joins single-label datasets; task {name!r} "
                             f"({ds.name}) is {ds.task} data")
    if classifier == "union":
        owner: dict[str, str] = {}
        for name, ds in zip(names, datasets):
            for c in ds.classnames:
                key = clean_classname(c).lower()
                if key in owner and owner[key] != name:
                    raise ValueError(f"tasks {owner[key]!r} and {name!r} both have a class named "
                                     f"{clean_classname(c)!r}: one softmax over the union of their classes "
                                     f"cannot tell them apart; set data.multi_task.classifier=per_task")
                owner[key] = name
    offsets, classnames = [], []
    for ds in datasets:
        offsets.append(len(classnames))
        classnames += list(ds.classnames)
    joint = JointDataset(list(names), list(datasets), None, offsets)  # type: ignore[arg-type]
    splits = {s: [it for t, ds in enumerate(datasets) for it in joint.joint_items(t, ds.split(s))]
              for s in ("train", "val", "test")}
    first = datasets[0]
    joint.joint = DatasetSplits("+".join(names), Path(first.root), classnames, list(first.templates), **splits)
    return joint
