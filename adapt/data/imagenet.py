"""ImageNet and its test-only variants (V2, Sketch, A, R) in the CoOp layout.

Labels follow CoOp: ImageNet and -Sketch number their WordNet-id folders in sorted order, -V2
its folders ``0``..``999``; -A and -R are the fixed 200-class subsets (the wnids in
``meta/imagenet_{a,r}.json``, sorted, as CoOp numbers their folders). Class names come from the
dataset folder's ``classnames.txt`` (``<wnid> <readable name>`` per line, the community's file)
for the wnids it lists, else from the copy shipped in ``meta/imagenet.json`` (CLIP's 1000
readable names).
ImageNet's official val set is the test split; there is no val split, since CoOp's code uses the
test images as "val" and adapt never selects on test images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from adapt.data.benchmark import locate
from adapt.data.config import DataConfig
from adapt.data.folder import IMAGE_EXTENSIONS, dataset_templates
from adapt.data.items import DatasetSplits, Item
from adapt.data.meta import dataset_meta
from adapt.data.registry import register_dataset

log = logging.getLogger(__name__)

LAYOUTS = {
    "imagenet": ("imagenet", "images", "root/imagenet/images/{train,val}/<wnid>/*.JPEG and optionally "
                 "root/imagenet/classnames.txt"),
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val",
                   "root/imagenetv2/imagenetv2-matched-frequency-format-val/{0..999}/*.jpeg"),
    "imagenet_sketch": ("imagenet-sketch", "images", "root/imagenet-sketch/images/<wnid>/*.JPEG"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "root/imagenet-adversarial/imagenet-a/<wnid>/*.jpg"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "root/imagenet-rendition/imagenet-r/<wnid>/*.jpg"),
}


def templates_of(key: str) -> list[str]:
    """The protocol's single template first, then CLIP's 7-template ensemble (a zero-shot
    ``ensemble: true`` averages all 8; CoOp's ImageNet ensemble is the 7 alone:
    ``recipes/zeroshot/imagenet_ensemble.yaml``)."""
    meta = dataset_meta(key)
    return list(meta["templates"]) + [t for t in meta.get("ensemble", []) if t not in meta["templates"]]


def imagenet_classnames(folder: Path) -> dict[str, str]:
    """wnid -> readable name: ``folder/classnames.txt`` where it names a class, else the shipped
    list (a file that lacks some wnids, e.g. one cut down to another subset, is completed from
    it, with a warning that names them)."""
    shipped = dict(dataset_meta("imagenet")["classnames"])
    file = folder / "classnames.txt"
    if not file.is_file():
        return shipped
    names = {}
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            if not name:
                raise ValueError(f"{file}, line {n}: expected '<wnid> <class name>', got {line!r}")
            names[wnid] = name.strip()
    missing = [w for w in shipped if w not in names]
    if missing:
        log.warning("%s names %d of the 1000 ImageNet classes; the other %d (%s%s) take the shipped "
                    "names (adapt/data/meta/imagenet.json)", file, 1000 - len(missing), len(missing),
                    ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
    return {**shipped, **names}


def _images(folder: Path, rel: str) -> list[str]:
    return sorted(f"{rel}/{p.name}" for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder(cfg: DataConfig, key: str) -> tuple[Path, Path, str]:
    name, image_dir, layout = LAYOUTS[key]
    folder = locate(cfg, name, layout)
    images = folder / image_dir
    if key == "imagenet" and not images.is_dir() and (folder / "train").is_dir():
        images = folder  # the torchvision layout: train/ and val/ directly in the folder
    if not images.is_dir():
        raise FileNotFoundError(f"{images} is missing; the {key} dataset expects {layout}")
    return folder, images, layout


def _scan(images: Path, wnids: list[str], names: dict[str, str], where: str) -> list[Item]:
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise ValueError(f"{where}: class folder(s) {unknown[:3]} have no name in classnames.txt or the "
                         f"shipped ImageNet list; is this an ImageNet-style folder of WordNet ids?")
    rel = images.name
    return [Item(f"{rel}/{p}", label) for label, w in enumerate(wnids) for p in _images(images / w, w)]


def _splits(key: str, cfg: DataConfig, folder: Path, wnids: list[str], names: dict[str, str],
            test: list[Item], train: Optional[list[Item]] = None) -> DatasetSplits:
    if not test:
        raise FileNotFoundError(f"no images found for {key} under {folder}; expected {LAYOUTS[key][2]}")
    return DatasetSplits(name=key, root=folder, classnames=[names[w] for w in wnids],
                         templates=dataset_templates(cfg, templates_of(key)),
                         train=train or [], val=[], test=test, class_ids=list(wnids))


@register_dataset("imagenet")
def load_imagenet(cfg: DataConfig) -> DatasetSplits:
    """ImageNet-1k: train/ for training, the official val/ as the test split."""
    folder, images, layout = _folder(cfg, "imagenet")
    for split in ("train", "val"):
        if not (images / split).is_dir():
            raise FileNotFoundError(f"{images / split} is missing; the imagenet dataset expects {layout}")
    wnids = _class_dirs(images / "train")
    names = imagenet_classnames(folder)
    prefix = images.relative_to(folder).as_posix()
    def scan(split: str) -> list[Item]:
        items = _scan(images / split, wnids, names, str(images / split))
        return [Item(f"{prefix}/{it.path}" if prefix != "." else it.path, it.label) for it in items]
    if _class_dirs(images / "val") != wnids:
        raise ValueError(f"{images / 'val'} must hold the same class folders as {images / 'train'} "
                         f"(the official val images sorted into <wnid>/ folders)")
    return _splits("imagenet", cfg, folder, wnids, names, scan("val"), scan("train"))


def _variant(key: str, wnids_of: callable):
    def load(cfg: DataConfig) -> DatasetSplits:
        folder, images, _ = _folder(cfg, key)
        names = imagenet_classnames(folder)
        wnids, folders = wnids_of(images, names)
        stray = sorted(set(_class_dirs(images)) - set(folders))
        if stray:
            raise ValueError(f"{images}: unexpected class folder(s) {stray[:3]}; expected {LAYOUTS[key][2]}")
        test = [Item(f"{images.name}/{p}", label) for label, f in enumerate(folders)
                if (images / f).is_dir() for p in _images(images / f, f)]
        return _splits(key, cfg, folder, wnids, names, test)

    load.__name__ = load.__qualname__ = f"load_{key}"
    load.__doc__ = f"{dataset_meta(key)['name']} (test only): {LAYOUTS[key][2]}."
    return register_dataset(key)(load)


def _all_1000(images: Path, names: dict[str, str]) -> tuple[list[str], list[str]]:
    wnids = sorted(dataset_meta("imagenet")["classnames"])  # never a classnames.txt's own list
    return wnids, [str(i) for i in range(len(wnids))]  # V2: folder i holds ImageNet class i


def _sorted_folders(images: Path, names: dict[str, str]) -> tuple[list[str], list[str]]:
    folders = _class_dirs(images)
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise ValueError(f"{images}: class folder(s) {unknown[:3]} are not ImageNet WordNet ids")
    return folders, folders


def _subset(key: str):
    def wnids_of(images: Path, names: dict[str, str]) -> tuple[list[str], list[str]]:
        wnids = sorted(dataset_meta(key)["wnids"])
        return wnids, wnids
    return wnids_of


_variant("imagenetv2", _all_1000)
_variant("imagenet_sketch", _sorted_folders)
_variant("imagenet_a", _subset("imagenet_a"))
_variant("imagenet_r", _subset("imagenet_r"))
