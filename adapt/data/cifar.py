"""CIFAR-10 and CIFAR-100 from their "python version" folders, as CLIP evaluates them.

``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (50 000 train /
10 000 test images, 10 classes) and ``root/cifar-100-python/{train, test, meta}`` (50 000 /
10 000, the 100 fine labels; the 20 coarse ones are not used). ``data.root`` may also be that
folder itself. Items are records of the batch files (``data_batch_1#17``: ``records.py``),
read by adapt's own readers (``cifar_batch.py``; torchvision's class insists on the published
files' md5, so it refuses a re-packed or miniature copy).

Splits: the official train batches give the training pool that few-shot samples draw from, the
test batch is the test split, and there is no validation split: CIFAR has no official one, and
adapt does as for ImageNet (``imagenet.py``) rather than carve one out of the training images,
so a K-shot run trains on the K images and never selects on test images.

Class names and templates are CLIP's (openai/CLIP ``data/prompts.md``), shipped in
``meta/cifar10.json`` / ``meta/cifar100.json``: CIFAR-10's are the file's own ``label_names``;
CIFAR-100's are its ``fine_label_names`` with ``_`` read as a space ("aquarium fish"). (LAION's
CLIP_benchmark takes CIFAR-100's names from torchvision and keeps the underscores, so its
prompts read "aquarium_fish".) The first template, "a photo of a {}.", is the single template of
a prompt method; the 18 form the zero-shot ensemble (``method.ensemble: true``). A meta file in
the folder must list the same classes in the same order: a copy whose labels mean other classes
would otherwise be scored against the wrong names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapt.data.benchmark import locate
from adapt.data.cifar_batch import read_batch, read_names
from adapt.data.config import DataConfig
from adapt.data.folder import dataset_templates
from adapt.data.imagenet import templates_of
from adapt.data.items import DatasetSplits, Item, clean_classname
from adapt.data.meta import dataset_meta
from adapt.data.records import label_items
from adapt.data.registry import register_table_entry


@dataclass(frozen=True)
class Cifar:
    name: str  # registry key and meta/<name>.json
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    archive: str  # the published file the folder comes from

    def layout(self) -> str:
        files = ", ".join(self.train + self.test + (self.meta,))
        return (f"root/{self.folder}/{{{files}}} (CIFAR's python version, as unpacked from {self.archive}); "
                f"data.root may also be the {self.folder} folder itself")


CIFARS = {c.name: c for c in (
    Cifar("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
          "batches.meta", "labels", "label_names", "cifar-10-python.tar.gz"),
    Cifar("cifar100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
          "cifar-100-python.tar.gz"),
)}


def _check_names(spec: Cifar, folder: Path, classnames: list[str]) -> None:
    file = folder / spec.meta
    if not file.is_file():
        return  # optional: the shipped names are CLIP's either way
    names = [clean_classname(n) for n in read_names(file, spec.names_key)]
    if names != classnames:
        diff = next((i for i, (a, b) in enumerate(zip(names, classnames)) if a != b), min(len(names), len(classnames)))
        raise ValueError(f"{file} lists {len(names)} classes that differ from {spec.name}'s {len(classnames)} "
                         f"(adapt/data/meta/{spec.name}.json) first at label {diff}: "
                         f"{names[diff] if diff < len(names) else '(none)'!r} vs "
                         f"{classnames[diff] if diff < len(classnames) else '(none)'!r}. This copy's labels would "
                         f"be scored against the wrong names: re-pack it in the original label order")


def _items(spec: Cifar, folder: Path, files: tuple[str, ...], n_classes: int) -> list[Item]:
    items: list[Item] = []
    for name in files:
        file = folder / name
        labels = read_batch(file).labels.get(spec.label_key)
        if labels is None:
            raise ValueError(f"{file} has no {spec.label_key!r} list of labels: is it a {spec.name} file "
                             f"(expected {spec.layout()})?")
        items += label_items(file, name, labels, n_classes, spec.name)
    return items


def load_cifar(spec: Cifar, cfg: DataConfig) -> DatasetSplits:
    folder = locate(cfg, spec.folder, spec.layout())
    missing = [name for name in spec.train + spec.test if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{spec.name}: {folder / missing[0]} is missing"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                f"expected {spec.layout()}")
    meta = dataset_meta(spec.name)
    classnames = list(meta["classnames"])
    _check_names(spec, folder, classnames)
    return DatasetSplits(name=spec.name, root=folder, classnames=classnames,
                         templates=dataset_templates(cfg, templates_of(spec.name)),
                         train=_items(spec, folder, spec.train, len(classnames)), val=[],
                         test=_items(spec, folder, spec.test, len(classnames)))


for _spec in CIFARS.values():
    register_table_entry(_spec.name, load_cifar, _spec, f"{dataset_meta(_spec.name)['name']}: {_spec.layout()}.")
