"""The in-memory form every dataset loader produces: relative paths, labels, class names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

# one class index, or (multi-label data) a multi-hot tuple over the class list: 1 present,
# 0 absent, -1 unknown (partial labels), or (segmentation) the label map's path relative to the
# dataset root
Label = Union[int, tuple[int, ...], str]


def clean_classname(name: str) -> str:
    """The readable form of a class name (folder names use underscores): every class name that
    reaches a prompt goes through here."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class Item:
    """One labelled image. ``path`` is relative to the dataset root so manifests stay portable."""

    path: str
    label: Label


def as_target(label: Label):
    """The form a batch carries: an int, or a multi-hot tuple as a tensor (so that batches
    stack to [B, K] rather than transpose)."""
    if isinstance(label, tuple):
        import torch  # only multi-label data pays for it here
        return torch.tensor(label, dtype=torch.long)
    return label


def positives(label: Label) -> list[int]:
    """The classes an item shows: its one class, or the present entries of a multi-hot label
    (none for a label map: which classes it holds is in the file)."""
    if isinstance(label, str):
        return []
    return [c for c, v in enumerate(label) if v == 1] if isinstance(label, tuple) else [label]


@dataclass
class DatasetSplits:
    """A dataset as loaded from disk: its root, class list, prompt templates and three splits.

    ``templates`` holds the dataset's hand-written prompt(s); the first one is the single template
    of the CoOp protocol, the rest (if any) form the zero-shot ensemble.
    """

    name: str
    root: Path
    classnames: list[str]
    templates: list[str]
    train: list[Item] = field(default_factory=list)
    val: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)
    # stable identifiers of the classes (ImageNet's WordNet ids), in label order, where a dataset
    # has them: domain generalization maps a target's classes onto the source's through these
    class_ids: Optional[list[str]] = None
    # what a label is (``adapt/tasks/``): one class per image, a multi-hot vector, a label map
    task: str = "single_label"
    # keyword options of the task's item reader for this dataset's files (segmentation:
    # ``reduce_zero_label``, the label maps' 0 is "no class" and every other id moves down one)
    read_options: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Item]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected one of train, val, test")
        return getattr(self, name)
