"""MNIST from its four IDX files, as CLIP evaluates it.

``root/MNIST/raw/{train,t10k}-images-idx3-ubyte`` and ``{train,t10k}-labels-idx1-ubyte`` (the
layout torchvision downloads to; each file may also be the published ``.gz``, and the plain
one is used when both are there, since it is memory-mapped rather than decompressed).
``data.root`` may also be the MNIST folder itself. 60 000 train / 10 000 test images of 28 x 28
grey levels; items are records of the images file (``raw/train-images-idx3-ubyte#17``:
``records.py``), opened as RGB (the grey value in all three channels) for CLIP.

Splits as for CIFAR (``cifar.py``): train is the few-shot pool, t10k the test split, no
validation split. Class names '0'..'9' and the one template 'a photo of the number: "{}".' are
CLIP's (openai/CLIP ``data/prompts.md``), in ``meta/mnist.json``.
"""
from __future__ import annotations

from pathlib import Path

from adapt.data.benchmark import locate
from adapt.data.config import DataConfig
from adapt.data.folder import dataset_templates
from adapt.data.idx import read_images, read_labels
from adapt.data.items import DatasetSplits, Item
from adapt.data.meta import dataset_meta
from adapt.data.records import label_items
from adapt.data.registry import register_dataset

FOLDER = "MNIST"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LAYOUT = (f"root/{FOLDER}/raw/{{train,t10k}}-images-idx3-ubyte and {{train,t10k}}-labels-idx1-ubyte "
          f"(or the published .gz files); data.root may also be the {FOLDER} folder itself")


def _file(folder: Path, name: str) -> str:
    """The file's path from the dataset folder: the plain file, else its .gz."""
    for rel in (f"raw/{name}", f"raw/{name}.gz"):
        if (folder / rel).is_file():
            return rel
    raise FileNotFoundError(f"mnist: {folder / 'raw' / name} (or {name}.gz) is missing; expected {LAYOUT}")


def _split(folder: Path, split: str, n_classes: int) -> list[Item]:
    images, labels = (_file(folder, name) for name in FILES[split])
    n_images, y = len(read_images(folder / images)), read_labels(folder / labels)
    if n_images != len(y):
        raise ValueError(f"{folder / images} holds {n_images} images but {folder / labels} holds {len(y)} "
                         f"labels: the two files are not a pair (one truncated or from another release); "
                         f"download both again")
    return label_items(folder / labels, images, y, n_classes, "mnist")


@register_dataset("mnist")
def load_mnist(cfg: DataConfig) -> DatasetSplits:
    """MNIST: root/MNIST/raw/ with the four IDX files (plain or .gz)."""
    folder = locate(cfg, FOLDER, LAYOUT)
    classnames = list(dataset_meta("mnist")["classnames"])
    return DatasetSplits(name="mnist", root=folder, classnames=classnames,
                         templates=dataset_templates(cfg, dataset_meta("mnist")["templates"]),
                         train=_split(folder, "train", len(classnames)), val=[],
                         test=_split(folder, "test", len(classnames)))
