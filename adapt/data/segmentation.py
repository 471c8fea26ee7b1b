"""Segmentation data: an image and a label map (a single-channel PNG of class indices, 255 =
ignore) per item, ``Item.label`` being the label map's path relative to the root.

* ``segmentation_csv``: ``path,mask,split`` rows and a class-list file (line i names class id i;
  ``data.classnames_file``, default ``classnames.txt``) for a user's own data; with
  ``data.reduce_zero_label=true`` line i names id i + 1 and 0 is no class.
* ``voc2012_seg``: PASCAL VOC 2012 as mmsegmentation's ``PascalVOCDataset`` reads it: the ids of
  ``ImageSets/Segmentation/train.txt`` train and ``val.txt`` tests, ``JPEGImages/<id>.jpg`` and
  ``SegmentationClass/<id>.png`` (palette indices: 0 background, 1-20 the classes, 255 the
  boundary band, ignored); ``data.split_file=train_aug.txt`` with the augmented set's
  ``SegmentationClassAug`` folder beside it trains on the 10,582 images of the usual "+aug" setup.
  ``data.reduce_zero_label=true`` gives VOC-20 (background ignored, the 20 object classes), the
  split MaskCLIP reports.
* ``ade20k``: ADE20K's scene-parsing release (``ADEChallengeData2016``), 150 classes, 0 = "other"
  ignored (mmseg's ``reduce_zero_label``, always on for it).
* ``pascal_context59``: PASCAL Context's 59 classes as mmseg converts them (the
  ``SegmentationClassContext`` PNGs of its ``convert_datasets/pascal_context.py``: 0 background,
  1-59 the classes), background ignored.
* ``coco_stuff164k``: COCO-Stuff 164k as mmseg converts it (``*_labelTrainIds.png``: train ids
  0-170, 255 ignore).

Class lists are mmseg's (``adapt/data/meta/<name>.json``); train trains and the validation set
tests, as every segmentation paper reports.

Before any model time is spent, the label maps are checked against their images: same size, and
no class id outside the class list (255 aside), each failure naming the file and the fix. A split
of more than ``CHECK_AT_MOST`` maps is checked on that many, evenly spaced (COCO-Stuff's 118k
would take minutes); the reader checks the size of every map it reads, and the metric every id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from adapt.data.config import DataConfig
from adapt.data.folder import DEFAULT_TEMPLATE, SPLITS, _relative, csv_rows, dataset_root, dataset_templates
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


CHECK_AT_MOST = 2000


def check_label_maps(root: Path, items: Sequence[Item], num_classes: int, where: str,
                     reduce_zero_label: bool = False) -> None:
    """Each item's label map exists, has its image's size and holds only ids < ``num_classes``
    (or 255; with ``reduce_zero_label`` ids up to ``num_classes``, 0 being no class). Reads each
    PNG once, the images only to their headers; at most ``CHECK_AT_MOST`` of them."""
    step = max(1, -(-len(items) // CHECK_AT_MOST))
    limit = num_classes + 1 if reduce_zero_label else num_classes
    for item in items[::step]:
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
        stray = [int(v) for v in values if v >= limit and v != IGNORE]
        if stray:
            ids = f"1..{num_classes}, 0 = no class" if reduce_zero_label else f"0..{num_classes - 1}"
            raise ValueError(f"{mask_path}: class id {stray[0]} is outside the {num_classes} classes "
                             f"({ids}; {IGNORE} = ignore); fix the map or the class list")


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
    for line, row in csv_rows(file, SEGMENTATION_CSV_HEADER):
        path, mask = (row.get("path") or "").strip(), (row.get("mask") or "").strip()
        split = (row.get("split") or "").strip().lower()
        if not path or not mask or split not in SPLITS:
            raise ValueError(f"{file}, line {line}: need a path, a mask and a split in {'/'.join(SPLITS)}; "
                             f"got {path!r}, {mask!r}, {split!r}")
        splits[split].append(Item(_relative(root, path), _relative(root, mask)))
    for s in ("train", "test"):
        if not splits[s]:
            raise ValueError(f"{file} has no rows with split={s}; expected {SEGMENTATION_CSV_LAYOUT}")
    reduce = bool(cfg.reduce_zero_label)  # then line i names id i + 1, and 0 is no class
    for s in SPLITS:
        check_label_maps(root, splits[s], len(classes), f"{file} ({s})", reduce)
    return DatasetSplits(name="segmentation_csv", root=root, classnames=[clean_classname(c) for c in classes],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="segmentation",
                         read_options={"reduce_zero_label": True} if reduce else {}, **splits)


# ------------------------------------------------------------------------------- voc2012_seg ---
@register_dataset("voc2012_seg")
def load_voc2012_seg(cfg: DataConfig) -> DatasetSplits:
    """PASCAL VOC 2012 segmentation, 21 classes (background included, as mmseg's): train.txt
    (or ``data.split_file``) trains, val.txt tests; ``data.reduce_zero_label=true``: VOC-20."""
    root = dataset_root(cfg, VOC2012_SEG_LAYOUT)
    train_file = cfg.split_file or "train.txt"
    masks = "SegmentationClassAug" if train_file.startswith("train_aug") else "SegmentationClass"
    reduce = bool(cfg.reduce_zero_label)

    def split(name: str, folder: str) -> list[Item]:
        return _listed(root, root / "ImageSets" / "Segmentation" / name, "JPEGImages/{}.jpg",
                       folder + "/{}.png", len(VOC_SEG_CLASSES) - reduce, reduce, VOC2012_SEG_LAYOUT, "voc2012_seg")

    classes = list(VOC_SEG_CLASSES[1:] if reduce else VOC_SEG_CLASSES)
    return DatasetSplits(name="voc2012_seg", root=root, classnames=classes,
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="segmentation",
                         train=split(train_file, masks), test=split("val.txt", "SegmentationClass"),
                         read_options={"reduce_zero_label": True} if reduce else {})


def _listed(root: Path, listing: Path, image: str, mask: str, num_classes: int, reduce: bool,
            layout: str, name: str) -> list[Item]:
    """Items of the ids listed one per line in ``listing`` (``image`` / ``mask``: paths with {})."""
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} is missing; the {name} dataset expects {layout}")
    ids = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
    items = [Item(image.format(i), mask.format(i)) for i in ids]
    check_label_maps(root, items, num_classes, str(listing), reduce)
    return items


def _paired(root: Path, images: str, masks: str, mask_suffix: str, num_classes: int, reduce: bool,
            layout: str, name: str) -> list[Item]:
    """Items of every ``*.jpg`` under ``root/images`` with its ``root/masks/<stem><mask_suffix>``."""
    folder = root / images
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no .jpg images in {folder}; the {name} dataset expects {layout}")
    items = [Item(f"{images}/{f.name}", f"{masks}/{f.stem}{mask_suffix}") for f in files]
    check_label_maps(root, items, num_classes, str(root / masks), reduce)
    return items


def _meta_dataset(name: str, layout: str, default_reduce: bool, split_files):
    """A loader of a mmseg-layout dataset whose class list is ``adapt/data/meta/<name>.json``;
    ``split_files(root, classes, reduce)`` -> (train items, test items)."""
    from adapt.data.meta import dataset_meta

    def load(cfg: DataConfig) -> DatasetSplits:
        root = dataset_root(cfg, layout)
        meta = dataset_meta(name)
        reduce = default_reduce if cfg.reduce_zero_label is None else bool(cfg.reduce_zero_label)
        classes = [clean_classname(c) for c in meta["segmentation_classes"]]
        train, test = split_files(root, len(classes), reduce)
        return DatasetSplits(name=name, root=root, classnames=classes,
                             templates=dataset_templates(cfg, meta["templates"]), task="segmentation",
                             train=train, test=test,
                             read_options={"reduce_zero_label": True} if reduce else {})

    load.__doc__ = f"{meta_name(name)}: {layout}."
    return register_dataset(name)(load)


def meta_name(name: str) -> str:
    from adapt.data.meta import dataset_meta

    return dataset_meta(name)["name"]


ADE20K_LAYOUT = ("root = ADEChallengeData2016 with images/{training,validation}/*.jpg and "
                 "annotations/{training,validation}/<same stem>.png")
CONTEXT_LAYOUT = ("root = VOCdevkit/VOC2010 with ImageSets/SegmentationContext/{train,val}.txt, "
                  "JPEGImages/<id>.jpg and SegmentationClassContext/<id>.png (mmseg's "
                  "convert_datasets/pascal_context.py output)")
COCO_STUFF_LAYOUT = ("root = coco_stuff164k with images/{train2017,val2017}/*.jpg and "
                     "annotations/{train2017,val2017}/<stem>_labelTrainIds.png (mmseg's "
                     "convert_datasets/coco_stuff164k.py output)")

_meta_dataset("ade20k", ADE20K_LAYOUT, True, lambda root, k, r: tuple(
    _paired(root, f"images/{s}", f"annotations/{s}", ".png", k, r, ADE20K_LAYOUT, "ade20k")
    for s in ("training", "validation")))
_meta_dataset("pascal_context59", CONTEXT_LAYOUT, True, lambda root, k, r: tuple(
    _listed(root, root / "ImageSets" / "SegmentationContext" / f"{s}.txt", "JPEGImages/{}.jpg",
            "SegmentationClassContext/{}.png", k, r, CONTEXT_LAYOUT, "pascal_context59") for s in ("train", "val")))
_meta_dataset("coco_stuff164k", COCO_STUFF_LAYOUT, False, lambda root, k, r: tuple(
    _paired(root, f"images/{s}", f"annotations/{s}", "_labelTrainIds.png", k, r, COCO_STUFF_LAYOUT,
            "coco_stuff164k") for s in ("train2017", "val2017")))
