"""Segmentation data: an image and a label map (a single-channel PNG of class indices, 255 =
ignore) per item, ``Item.label`` being the label map's path relative to the root.

* ``segmentation_csv``: ``path,mask,split`` rows and a class-list file (line i names class id i;
  ``data.classnames_file``, default ``classnames.txt``) for a user's own data.
* ``voc2012_seg``: PASCAL VOC 2012 as mmsegmentation's ``PascalVOCDataset`` reads it: the ids of
  ``ImageSets/Segmentation/train.txt`` train and ``val.txt`` tests, ``JPEGImages/<id>.jpg`` and
  ``SegmentationClass/<id>.png`` (palette indices: 0 background, 1-20 the classes, 255 the
  boundary band, ignored); ``data.split_file=train_aug.txt`` with the augmented set's
  ``SegmentationClassAug`` folder beside it trains on the 10,582 images of the usual "+aug" setup.

Before any model time is spent, every label map is checked against its image: same size, and
no class id outside the class list (255 aside), each failure naming the file and the fix.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from adapt.data.config import DataConfig
from adapt.data.folder import DEFAULT_TEMPLATE, SPLITS, _relative, dataset_root, dataset_templates
from adapt.data.items import DatasetSplits, Item, clean_classname
from adapt.data.registry import register_dataset

IGNORE = 255  # the label value no metric or loss counts (adapt/tasks/segmentation.py)
SEGMENTATION_CSV_HEADER = ("path", "mask", "split")
SEGMENTATION_CSV_LAYOUT = ("root/<split_file, default data.csv> with the header line 'path,mask,split' "
                           "(image and label-map PNG paths relative to root; split = train/val/test) and "
                           "root/<classnames_file, default classnames.txt> with one class name per line "
                           "(line i = class id i in the label maps; 255 = ignore)")
VOC_SEG_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                   "sheep", "sofa", "train", "tvmonitor")
VOC2012_SEG_LAYOUT = ("root = VOCdevkit/VOC2012 with ImageSets/Segmentation/train.txt and val.txt (one image "
                      "id per line), JPEGImages/<id>.jpg and SegmentationClass/<id>.png (or, for "
                      "data.split_file=train_aug.txt, SegmentationClassAug/<id>.png)")


def check_label_maps(root: Path, items: Sequence[Item], num_classes: int, where: str) -> None:
    """Each item's label map exists, has its image's size and holds only ids < ``num_classes``
    (or 255). Reads each PNG once; the images only to their headers."""
    for item in items:
        mask_path, image_path = root / item.label, root / item.path
        if not mask_path.is_file():
            raise FileNotFoundError(f"{where}: label map {mask_path} (for {item.path}) does not exist")
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P"):
                raise ValueError(f"{mask_path}: a label map must be a single-channel PNG of class indices "
                                 f"(mode L or P), not mode {m.mode}; save it with one class id per pixel")
            values = np.unique(np.asarray(m))
            size = m.size
        if image_path.is_file():
            with Image.open(image_path) as im:
                if im.size != size:
                    raise ValueError(f"{mask_path}: the label map is {size[0]}x{size[1]} but its image "
                                     f"{image_path} is {im.size[0]}x{im.size[1]}; a label map must have its "
                                     "image's size")
        stray = [int(v) for v in values if v >= num_classes and v != IGNORE]
        if stray:
            raise ValueError(f"{mask_path}: class id {stray[0]} is outside the {num_classes} classes "
                             f"(0..{num_classes - 1}; {IGNORE} = ignore); fix the map or the class list")


# -------------------------------------------------------------------------- segmentation_csv ---
@register_dataset("segmentation_csv")
def load_segmentation_csv(cfg: DataConfig) -> DatasetSplits:
    """A CSV with columns ``path,mask,split`` and a class-list file."""
    root = dataset_root(cfg, SEGMENTATION_CSV_LAYOUT)
    file = root / (cfg.split_file or "data.csv")
    names_file = root / (cfg.classnames_file or "classnames.txt")
    for f, what in ((file, "CSV file"), (names_file, "class-list file")):
        if not f.is_file():
            raise FileNotFoundError(f"{what} {f} does not exist; the segmentation_csv dataset expects "
                                    f"{SEGMENTATION_CSV_LAYOUT}")
    classes = [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in SEGMENTATION_CSV_HEADER if c not in header]
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(missing)}; expected the header line "
                             f"'{','.join(SEGMENTATION_CSV_HEADER)}', found {','.join(header) or 'none'}")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            path, mask = (row.get("path") or "").strip(), (row.get("mask") or "").strip()
            split = (row.get("split") or "").strip().lower()
            if not path or not mask or split not in SPLITS:
                raise ValueError(f"{file}, line {line}: need a path, a mask and a split in {'/'.join(SPLITS)}; "
                                 f"got {path!r}, {mask!r}, {split!r}")
            splits[split].append(Item(_relative(root, path), _relative(root, mask)))
    for s in ("train", "test"):
        if not splits[s]:
            raise ValueError(f"{file} has no rows with split={s}; expected {SEGMENTATION_CSV_LAYOUT}")
    for s in SPLITS:
        check_label_maps(root, splits[s], len(classes), f"{file} ({s})")
    return DatasetSplits(name="segmentation_csv", root=root, classnames=[clean_classname(c) for c in classes],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="segmentation", **splits)


# ------------------------------------------------------------------------------- voc2012_seg ---
@register_dataset("voc2012_seg")
def load_voc2012_seg(cfg: DataConfig) -> DatasetSplits:
    """PASCAL VOC 2012 segmentation, 21 classes (background included, as mmseg's): train.txt
    (or ``data.split_file``) trains, val.txt tests."""
    root = dataset_root(cfg, VOC2012_SEG_LAYOUT)
    train_file = cfg.split_file or "train.txt"
    masks = "SegmentationClassAug" if train_file.startswith("train_aug") else "SegmentationClass"

    def split(name: str, folder: str) -> list[Item]:
        listing = root / "ImageSets" / "Segmentation" / name
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} is missing; the voc2012_seg dataset expects {VOC2012_SEG_LAYOUT}")
        ids = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
        items = [Item(f"JPEGImages/{i}.jpg", f"{folder}/{i}.png") for i in ids]
        check_label_maps(root, items, len(VOC_SEG_CLASSES), str(listing))
        return items

    return DatasetSplits(name="voc2012_seg", root=root, classnames=list(VOC_SEG_CLASSES),
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="segmentation",
                         train=split(train_file, masks), test=split("val.txt", "SegmentationClass"))
