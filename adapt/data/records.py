"""Items that are records of an array file: the path form ``<file>#<index>``.

MNIST and CIFAR have no image files; their images are rows of a few array files. An item's
path names the file (relative to the dataset root, like any image path, so manifests stay
portable) and the record's index in it, e.g. ``data_batch_3#1234``: the one data path
(``load_image``, the image checks, the feature cache's file stamps) opens it like an image file,
and a manifest's paths name the same images on every rerun. A path is read this way only when
no file of that name exists and it ends in ``#<digits>``.

The file's format is told by its name (MNIST's ``*-ubyte[.gz]``) or by an IDX magic number;
anything else is read as a CIFAR python batch. Files are decoded once per process
(``array_cache``); opening a record after that is an array lookup and an RGB conversion (about
40 us for a CIFAR or MNIST image, measured on full-size synthetic files: 50 000 CIFAR images load
in 0.5 s, and the up-front check of 10 000 test records takes 0.8 s).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from adapt.data.array_cache import once_per_file
from adapt.data.cifar_batch import read_batch
from adapt.data.idx import GZIP_MAGIC, read_images
from adapt.data.items import Item

SEP = "#"


def record_path(file: str, index: int) -> str:
    return f"{file}{SEP}{index}"


def label_items(file: Path, rel: str, labels: np.ndarray, n_classes: int, dataset: str) -> list[Item]:
    """One item per record of ``file`` (``rel``: its path from the dataset root), labels checked
    to lie in 0..n_classes-1."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise ValueError(f"{file}: record {bad[0]} has label {labels[bad[0]]}, outside 0..{n_classes - 1} "
                         f"({len(bad)} such records): it is not a {dataset} file; restore the original")
    return [Item(record_path(rel, i), y) for i, y in enumerate(labels.tolist())]


def record_of(path: Path) -> Optional[tuple[Path, int]]:
    """(file, index) when ``path`` has the record form, else None (a real file's name may
    contain ``#``: callers look for the file first)."""
    stem, sep, index = Path(path).name.rpartition(SEP)
    if not (sep and stem and index.isascii() and index.isdigit()):
        return None
    return Path(path).with_name(stem), int(index)


def _is_idx(file: Path) -> bool:
    if "-ubyte" in file.name:
        return True
    with open(file, "rb") as f:
        head = f.read(3)
    return head[:2] == GZIP_MAGIC or head == b"\x00\x00\x08"


@once_per_file
def images_of(file: Path) -> np.ndarray:
    """Every image of an array file: [n, h, w] (grayscale) or [n, h, w, 3] uint8."""
    return read_images(file) if _is_idx(file) else read_batch(file).images


def open_record(file: Path, index: int) -> Image.Image:
    """Record ``index`` of ``file`` as an RGB image (grayscale is repeated over the channels, as
    CLIP's preprocessing expects three)."""
    images = images_of(file)
    if index >= len(images):
        raise IndexError(f"{file} holds {len(images)} images, so record {SEP}{index} does not exist: the "
                         f"item list or manifest was made from another copy of the file")
    return Image.fromarray(np.ascontiguousarray(images[index])).convert("RGB")


def source_file(path: Path) -> Path:
    """The file that holds ``path``'s image: the path itself, or a record's array file."""
    record = record_of(path) if not Path(path).exists() else None
    return record[0] if record else Path(path)
