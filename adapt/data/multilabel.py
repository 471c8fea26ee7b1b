"""Multi-label data: several classes per image as a multi-hot tuple (1 present, 0 absent,
-1 unknown), in the community's layouts and a CSV form, plus seeded partial-label masks.

* ``multilabel_csv``: ``path,labels,split[,unknown]`` with ``labels`` (and ``unknown``) the
  image's class names joined by ``;``; the class list is ``data.classnames_file`` or the sorted
  union of the names (each needs a training row, so a typo cannot become a class).
* ``voc2007``: PASCAL VOC 2007 as DualCoOp and TaI-DPT read it: ``ImageSets/Main/trainval.txt``
  trains, ``test.txt`` tests, labels from ``Annotations/<id>.xml``; objects marked difficult are
  left out (absent, 0), as both originals do; the class names are VOC's own words
  (``diningtable``, ``tvmonitor``), which the originals put into their prompts as they are.
* ``partial_labels``: DualCoOp's partial-label protocol. Each (image, class) entry stays known
  with probability ``p`` (a Bernoulli mask) and becomes -1 otherwise, whether it was present or
  absent. The original draws its mask from torch's global generator and saves it beside the
  annotations; here it is drawn from a generator seeded by the run's seed, and the masked labels
  are what the run's manifest stores.
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from adapt.data.config import DataConfig
from adapt.data.folder import DEFAULT_TEMPLATE, SPLITS, _relative, dataset_root, dataset_templates
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
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in MULTILABEL_CSV_HEADER if c not in header]
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(missing)}; expected the header line "
                             f"'{','.join(MULTILABEL_CSV_HEADER)}', found {','.join(header) or 'none'}")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
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
