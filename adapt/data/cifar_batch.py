"""CIFAR's "python version" files, read without torchvision (whose md5 check refuses any copy
but the published one) and through the restricted unpickler (``safe_pickle``).

A batch file is a pickled dict: ``data``, an N x 3072 uint8 array (each row the 1024 red, then
green, then blue values of a 32 x 32 image), and the labels, ``labels`` (CIFAR-10) or
``fine_labels`` / ``coarse_labels`` (CIFAR-100), lists of N ints; also ``batch_label`` and
``filenames``, which adapt does not need. The meta file (``batches.meta``, ``meta``) is a dict
with ``label_names`` (CIFAR-10) or ``fine_label_names`` / ``coarse_label_names`` (CIFAR-100).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapt.data.array_cache import once_per_file
from adapt.data.safe_pickle import load_pickle

SIDE = 32
LABEL_KEYS = ("labels", "fine_labels", "coarse_labels")


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # [N, 32, 32, 3] uint8 (a view of the file's rows)
    labels: dict[str, np.ndarray]  # the file's label lists by key, each [N] int64


def _dict(obj, path: Path, what: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR {what} file; "
                         f"replace it with the dataset's original")
    return obj


@once_per_file
def read_batch(path: Path) -> Batch:
    """The images and label lists of one batch file (``data_batch_1``, ``test_batch``, ``train``)."""
    obj = _dict(load_pickle(path), path, "batch")
    data = obj.get("data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * SIDE * SIDE):
        got = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be an N x {3 * SIDE * SIDE} uint8 array (3 x {SIDE} x {SIDE} "
                         f"per row, channel-major), got {got}; re-pack the file in CIFAR's layout")
    n = len(data)
    labels = {}
    for key in LABEL_KEYS:
        if key in obj:
            values = np.asarray(obj[key])
            if values.ndim != 1 or (len(values) and not np.issubdtype(values.dtype, np.integer)):
                raise ValueError(f"{path}: {key!r} must be a list of integer labels, got {values.dtype} "
                                 f"of shape {list(values.shape)}")
            if len(values) != n:
                raise ValueError(f"{path} holds {n} images but {len(values)} {key!r}: every image needs one "
                                 f"label; the file is damaged or was re-packed wrongly")
            labels[key] = values.astype(np.int64)
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # channel-major rows -> HWC
    return Batch(images, labels)


def read_names(path: Path, key: str) -> list[str]:
    """The class names ``key`` of a meta file (``label_names``, ``fine_label_names``)."""
    obj = _dict(load_pickle(path), path, "meta")
    names = obj.get(key)
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path} has no list of class names {key!r} (keys: {sorted(map(str, obj))}); "
                         f"replace it with the dataset's original")
    return names
