"""Datasets, K-shot sampling, base/novel splits and transforms (the LightningDataModule that
applies a setting to them is ``adapt/datamodule.py``: settings build on this package).

The light parts import eagerly (``adapt.config`` imports this package to read a recipe); the
ones that pull in torchvision or Lightning load on first attribute access.
"""
from __future__ import annotations

import importlib

from adapt.data import folder  # noqa: F401  (registers imagefolder, csv, zhou)
from adapt.data.config import DataConfig
from adapt.data.fewshot import (Manifest, check_manifest, few_shot_splits, read_manifest, sample_few_shot,
                                sample_validation, write_manifest)
from adapt.data.items import DatasetSplits, Item
from adapt.data.registry import build_dataset, get_dataset, list_datasets, register_dataset
from adapt.data.splits import subsample_classes, subset_labels

_LAZY = {
    "ImageDataset": "adapt.data.image_dataset",
    "load_image": "adapt.data.image_dataset",
    "train_transform": "adapt.data.transforms",
    "test_transform": "adapt.data.transforms",
}

__all__ = ["DataConfig", "DatasetSplits", "Item", "Manifest", "build_dataset", "check_manifest",
           "few_shot_splits", "get_dataset", "list_datasets", "read_manifest", "register_dataset",
           "sample_few_shot", "sample_validation", "subsample_classes", "subset_labels",
           "write_manifest", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapt.data' has no attribute {name!r}")
