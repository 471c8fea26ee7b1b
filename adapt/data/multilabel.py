"""Multi-label data: several classes per image as a multi-hot tuple (1 present, 0 absent,
-1 unknown), in the community's layouts and a CSV form, plus seeded partial-label masks.

* ``multilabel_csv``: ``path,labels,split[,unknown]`` with ``labels`` (and ``unknown``) the
  image's class names joined by ``;``; the class list is ``data.classnames_file`` or the sorted
  union of the names (each needs a training row, so a typo cannot become a class).
* ``voc2007``: PASCAL VOC 2007 as DualCoOp and TaI-DPT read it: ``ImageSets/Main/trainval.txt``
  trains, ``test.txt`` tests, labels from ``Annotations/<id>.xml``; objects marked difficult are
  left out (absent, 0), as both originals do; the class names are VOC's own words
  (``diningtable``, ``tvmonitor``), which the originals put into their prompts as they are.
* ``coco2014``: MS-COCO 2014 as DualCoOp reads it: ``annotations/instances_{train,val}2014.json``,
  the 80 categories in category-id order (COCO's own names), the images that have at least one
  annotation, in the order they first appear in the annotations (pycocotools' ``imgToAnns``);
  crowd regions count as objects, as there. Read with the standard ``json`` module.
* ``nus_wide``: NUS-WIDE's official 81-concept release: ``Concepts81.txt``,
  ``ImageList/{Train,Test}Imagelist.txt`` and ``Groundtruth/TrainTestLabels/Labels_<concept>_{Train,
  Test}.txt`` (one 0/1 per image line), images under ``Flickr/``. Many of its Flickr images are
  gone from every copy: ``data.bad_images=skip`` trains and tests on those present, and counts the
  rest. (DualCoOp's own NUS-WIDE files are a zero-shot split over 1,006 tags, not this release.)
* ``partial_labels``: DualCoOp's partial-label protocol. Each (image, class) entry stays known
  with probability ``p`` (a Bernoulli mask) and becomes -1 otherwise, whether it was present or
  absent. The original draws its mask from torch's global generator and saves it beside the
  annotations; here it is drawn from a generator seeded by the run's seed, and the masked labels
  are what the run's manifest stores.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from adapt.data.config import DataConfig
from adapt.data.folder import DEFAULT_TEMPLATE, SPLITS, _relative, csv_rows, dataset_root, dataset_templates
from adapt.data.items import DatasetSplits, Item, clean_classname
from adapt.data.registry import register_dataset

MULTILABEL_CSV_HEADER = ("path", "labels", "split")
MULTILABEL_CSV_LAYOUT = ("root/<split_file, default data.csv> with the header line 'path,labels,split' "
                         "and an optional 'unknown' column (path relative to root; labels and unknown "
                         "= class names joined by ';'; split = train/val/test)")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
VOC2007_LAYOUT = ("root = VOCdevkit/VOC2007 with ImageSets/Main/trainval.txt and test.txt (one image id "
                  "per line), Annotations/<id>.xml and JPEGImages/<id>.jpg")


def multi_hot(present: Sequence[int], unknown: Sequence[int], n: int) -> tuple[int, ...]:
    row = [0] * n
    for c in unknown:
        row[c] = -1
    for c in present:
        row[c] = 1
    return tuple(row)


def partial_labels(items: Sequence[Item], known: float, generator) -> list[Item]:
    """``items`` with each label entry kept with probability ``known``, else set to -1 (unknown).
    ``generator`` is a seeded ``torch.Generator``; one [N, K] draw, in item order."""
    import torch

    items = list(items)
    if known >= 1.0 or not items:
        return items
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    keep = torch.rand(labels.shape, generator=generator) < known
    masked = torch.where(keep, labels, torch.full_like(labels, -1))
    return [Item(it.path, tuple(row)) for it, row in zip(items, masked.tolist())]


# ---------------------------------------------------------------------------- multilabel_csv ---
def _names(cell: str) -> list[str]:
    return [n.strip() for n in cell.split(";") if n.strip()]


@register_dataset("multilabel_csv")
def load_multilabel_csv(cfg: DataConfig) -> DatasetSplits:
    """A CSV with columns ``path,labels,split`` (and optionally ``unknown``)."""
    root = dataset_root(cfg, MULTILABEL_CSV_LAYOUT)
    file = root / (cfg.split_file or "data.csv")
    if not file.is_file():
        raise FileNotFoundError(f"CSV file {file} does not exist; the multilabel_csv dataset expects "
                                f"{MULTILABEL_CSV_LAYOUT}")
    rows = []  # (path, present names, unknown names, split, line)
    for line, row in csv_rows(file, MULTILABEL_CSV_HEADER):
        path, split = (row.get("path") or "").strip(), (row.get("split") or "").strip().lower()
        if not path or split not in SPLITS:
            raise ValueError(f"{file}, line {line}: need a path and a split in {'/'.join(SPLITS)}; "
                             f"got {path!r}, {split!r}")
        present, unknown = _names(row.get("labels") or ""), _names(row.get("unknown") or "")
        both = sorted(set(present) & set(unknown))
        if both:
            raise ValueError(f"{file}, line {line}: class {both[0]!r} is both in labels and in unknown")
        rows.append((_relative(root, path), present, unknown, split, line))
    classes = _classes(cfg, root, file, rows)
    index = {name: i for i, name in enumerate(classes)}
    splits = {s: [Item(p, multi_hot([index[n] for n in pr], [index[n] for n in un], len(classes)))
                  for p, pr, un, sp, _ in rows if sp == s] for s in SPLITS}
    for s in ("train", "test"):
        if not splits[s]:
            raise ValueError(f"{file} has no rows with split={s}; expected {MULTILABEL_CSV_LAYOUT}")
    return DatasetSplits(name="multilabel_csv", root=root, classnames=[clean_classname(c) for c in classes],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="multi_label", **splits)


def _classes(cfg: DataConfig, root: Path, file: Path, rows) -> list[str]:
    """``data.classnames_file`` (every name in the CSV must be in it), else the sorted union of
    the names, each of which needs a training row."""
    lines: dict[str, list[tuple[str, int]]] = {}
    for _, present, unknown, split, line in rows:
        for name in present + unknown:
            lines.setdefault(name, []).append((split, line))
    if cfg.classnames_file:
        cls_file = root / cfg.classnames_file
        if not cls_file.is_file():
            raise FileNotFoundError(f"data.classnames_file {cls_file} does not exist (one class name per line)")
        classes = [ln.strip() for ln in cls_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        stray = [n for n in lines if n not in classes]
        if stray:
            raise ValueError(f"{file}, line {lines[stray[0]][0][1]}: class {stray[0]!r} is not in {cls_file}"
                             + (f" (and {len(stray) - 1} more unknown classes)" if len(stray) > 1 else "")
                             + "; fix the name or add the class to the class-list file")
        return classes
    for name in sorted(lines):
        if not any(split == "train" for split, _ in lines[name]):
            raise ValueError(f"{file}, line {lines[name][0][1]}: class {name!r} appears in no training row; "
                             "a misspelt name becomes a class of its own. Fix the name, or list the classes "
                             "in data.classnames_file")
    return sorted(lines)


# ----------------------------------------------------------------------------------- voc2007 ---
def _voc_label(file: Path) -> tuple[int, ...]:
    try:
        tree = ET.parse(file)
    except (OSError, ET.ParseError) as err:
        raise ValueError(f"cannot read the VOC annotation {file}: {err}") from None
    present = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in VOC_CLASSES:
            raise ValueError(f"{file}: object {name!r} is not one of the 20 VOC classes")
        if (obj.findtext("difficult") or "0").strip() == "1":
            continue  # the originals skip difficult objects: the class stays absent
        present.append(VOC_CLASSES.index(name))
    return multi_hot(present, [], len(VOC_CLASSES))


@register_dataset("voc2007")
def load_voc2007(cfg: DataConfig) -> DatasetSplits:
    """PASCAL VOC 2007 multi-label: trainval trains, test tests (no validation split)."""
    root = dataset_root(cfg, VOC2007_LAYOUT)

    def split(name: str) -> list[Item]:
        listing = root / "ImageSets" / "Main" / f"{name}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} is missing; the voc2007 dataset expects {VOC2007_LAYOUT}")
        ids = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
        missing = [i for i in ids if not (root / "Annotations" / f"{i}.xml").is_file()]
        if missing:
            raise FileNotFoundError(f"{listing} lists {len(missing)} image(s) without an annotation, e.g. "
                                    f"{root / 'Annotations' / (missing[0] + '.xml')}; expected {VOC2007_LAYOUT}")
        return [Item(f"JPEGImages/{i}.jpg", _voc_label(root / "Annotations" / f"{i}.xml")) for i in ids]

    return DatasetSplits(name="voc2007", root=root, classnames=list(VOC_CLASSES),
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="multi_label",
                         train=split("trainval"), test=split("test"))


# ---------------------------------------------------------------------------------- coco2014 ---
COCO2014_LAYOUT = ("root with annotations/instances_train2014.json and instances_val2014.json, and the "
                   "images in train2014/ and val2014/")


@register_dataset("coco2014")
def load_coco2014(cfg: DataConfig) -> DatasetSplits:
    """MS-COCO 2014 multi-label, 80 classes: train2014 trains, val2014 tests."""
    import json

    root = dataset_root(cfg, COCO2014_LAYOUT)
    classes: list[str] = []

    def split(name: str) -> list[Item]:
        file = root / "annotations" / f"instances_{name}.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; the coco2014 dataset expects {COCO2014_LAYOUT}")
        data = json.loads(file.read_text())
        cats = sorted(data["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        if classes and names != classes:
            raise ValueError(f"{file}: its categories differ from the training annotations'")
        classes[:] = names
        index = {c["id"]: i for i, c in enumerate(cats)}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        present: dict[int, set[int]] = {}  # image id -> classes, in first-annotation order
        for ann in data["annotations"]:
            present.setdefault(ann["image_id"], set()).add(index[ann["category_id"]])
        return [Item(f"{name}/{files[i]}", multi_hot(sorted(c), [], len(cats))) for i, c in present.items()]

    train, test = split("train2014"), split("val2014")
    return DatasetSplits(name="coco2014", root=root, classnames=[clean_classname(c) for c in classes],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="multi_label",
                         train=train, test=test)


# ---------------------------------------------------------------------------------- nus_wide ---
NUS_WIDE_LAYOUT = ("root with Concepts81.txt, ImageList/TrainImagelist.txt and TestImagelist.txt, "
                   "Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt and _Test.txt, and the images "
                   "under Flickr/ (the paths of the image lists)")


@register_dataset("nus_wide")
def load_nus_wide(cfg: DataConfig) -> DatasetSplits:
    """NUS-WIDE, the 81 concepts: the official train / test image lists."""
    root = dataset_root(cfg, NUS_WIDE_LAYOUT)
    concepts_file = root / "Concepts81.txt"
    if not concepts_file.is_file():
        raise FileNotFoundError(f"{concepts_file} is missing; the nus_wide dataset expects {NUS_WIDE_LAYOUT}")
    concepts = [ln.strip() for ln in concepts_file.read_text().splitlines() if ln.strip()]

    def split(name: str) -> list[Item]:
        listing = root / "ImageList" / f"{name}Imagelist.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} is missing; the nus_wide dataset expects {NUS_WIDE_LAYOUT}")
        paths = [ln.strip().replace("\\", "/") for ln in listing.read_text().splitlines() if ln.strip()]
        columns = []
        for c in concepts:
            f = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{name}.txt"
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing; the nus_wide dataset expects {NUS_WIDE_LAYOUT}")
            values = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
            if len(values) != len(paths) or any(v not in ("0", "1") for v in values):
                raise ValueError(f"{f}: expected one 0 or 1 per image of {listing} ({len(paths)} lines), "
                                 f"found {len(values)} lines")
            columns.append(values)
        return [Item(f"Flickr/{p}", tuple(int(col[i]) for col in columns)) for i, p in enumerate(paths)]

    return DatasetSplits(name="nus_wide", root=root, classnames=[clean_classname(c) for c in concepts],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), task="multi_label",
                         train=split("Train"), test=split("Test"))
