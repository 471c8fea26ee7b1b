"""Loaders for data already on disk: ``imagefolder``, ``csv`` and ``zhou`` (the CoOp split JSON).

Every loader returns paths relative to ``data.root`` so that manifests stay portable, labels in
sorted class order, and class names with underscores turned into spaces (the CoOp convention).
Nothing here opens an image: a dataset with a million files should load in seconds; the files a
run selects are checked up front by ``checks.py``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from adapt.data.config import DataConfig
from adapt.data.items import DatasetSplits, Item, clean_classname
from adapt.data.registry import register_dataset

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_TEMPLATE = "a photo of a {}."
SPLITS = ("train", "val", "test")

IMAGEFOLDER_LAYOUT = ("root/train/<class>/<image>, optionally root/val/<class>/<image>, and "
                      "root/test/<class>/<image> (one folder per class, images "
                      f"{'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))})")
CSV_HEADER = ("path", "label", "split")
CSV_LAYOUT = (f"root/<split_file, default data.csv> with the header line '{','.join(CSV_HEADER)}' "
              "(path relative to root, label = class name, split = train/val/test)")
ZHOU_LAYOUT = ('root/<split_file>, a JSON {"train": [[relative_path, label, classname], ...], '
               '"val": [...], "test": [...]}, and the images under root (or one folder inside it)')


def dataset_root(cfg: DataConfig, layout: str) -> Path:
    """``data.root`` as an existing folder, or an error that says which layout is expected."""
    if not cfg.root:
        raise ValueError(f"data.root is not set; the {cfg.dataset!r} dataset expects {layout}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} does not exist or is not a folder; "
                                f"the {cfg.dataset!r} dataset expects {layout}")
    return root


def dataset_templates(cfg: DataConfig, default: Sequence[str]) -> list[str]:
    """``data.templates`` if set, else the dataset's own; a template without ``{}`` would give
    every class the same prompt, so it is refused."""
    templates = list(cfg.templates) if cfg.templates else list(default)
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' for the class name (data.templates)")
    return templates


def _relative(root: Path, raw: str) -> str:
    """A path from a list file, as a POSIX path relative to root when it lies under root."""
    path = raw.strip().replace("\\", "/")
    if os.path.isabs(path):
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return path  # outside root: usable, but not portable
    return PurePosixPath(path).as_posix()


# ----------------------------------------------------------------------------------- imagefolder
def _subdirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.name)


def _scan_split(root: Path, split: str, class_folders: list[str]) -> list[Item]:
    folder = root / split
    items = []
    for d in _subdirs(folder):
        if d.name not in class_folders:
            raise ValueError(f"{d} is a class folder that {root / 'train'} does not have; "
                             f"every split must use the training split's class folders")
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"class folder {d} holds no images; expected {IMAGEFOLDER_LAYOUT}")
        label = class_folders.index(d.name)
        items += [Item(p.relative_to(root).as_posix(), label) for p in files]
    return items


@register_dataset("imagefolder")
def load_imagefolder(cfg: DataConfig) -> DatasetSplits:
    """One folder per class in ``train/``, ``test/`` and optionally ``val/``."""
    root = dataset_root(cfg, IMAGEFOLDER_LAYOUT)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is missing; the imagefolder dataset expects "
                                    f"{IMAGEFOLDER_LAYOUT}")
    class_folders = [d.name for d in _subdirs(root / "train")]
    if not class_folders:
        raise ValueError(f"{root / 'train'} has no class folders; expected {IMAGEFOLDER_LAYOUT}")
    splits = {s: _scan_split(root, s, class_folders) if (root / s).is_dir() else [] for s in SPLITS}
    return DatasetSplits(name="imagefolder", root=root,
                         classnames=[clean_classname(c) for c in class_folders],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), **splits)


# ------------------------------------------------------------------------------------------- csv
def csv_rows(file: Path, header: Sequence[str]):
    """(line number, row) of a CSV whose header must hold the columns ``header`` (names stripped;
    a spreadsheet's byte-order mark tolerated); a missing column is one message naming them."""
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        found = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in header if c not in found]
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(missing)}; expected the header "
                             f"line '{','.join(header)}', found {','.join(found) or 'none'}")
        reader.fieldnames = found
        yield from enumerate(reader, start=2)


@register_dataset("csv")
def load_csv(cfg: DataConfig) -> DatasetSplits:
    """A CSV with columns ``path,label,split``; classes are the sorted unique labels."""
    root = dataset_root(cfg, CSV_LAYOUT)
    file = root / (cfg.split_file or "data.csv")
    if not file.is_file():
        raise FileNotFoundError(f"CSV file {file} does not exist; the csv dataset expects {CSV_LAYOUT}")
    rows: list[tuple[str, str, str, int]] = []  # path, label, split, line number
    for line, row in csv_rows(file, CSV_HEADER):
        path, label, split = ((row.get(c) or "").strip() for c in CSV_HEADER)
        if not path or not label or split.lower() not in SPLITS:
            raise ValueError(f"{file}, line {line}: need a path, a label and a split in "
                             f"{'/'.join(SPLITS)}; got {path!r}, {label!r}, {split!r}")
        rows.append((_relative(root, path), label, split.lower(), line))
    labels = _csv_classes(cfg, root, file, rows)
    index = {label: i for i, label in enumerate(labels)}
    splits = {s: [Item(p, index[label]) for p, label, sp, _ in rows if sp == s] for s in SPLITS}
    for s in ("train", "test"):
        if not splits[s]:
            raise ValueError(f"{file} has no rows with split={s}; expected {CSV_LAYOUT}")
    return DatasetSplits(name="csv", root=root, classnames=[clean_classname(c) for c in labels],
                         templates=dataset_templates(cfg, [DEFAULT_TEMPLATE]), **splits)


def _csv_classes(cfg: DataConfig, root: Path, file: Path, rows) -> list[str]:
    """The class list: ``data.classnames_file`` if given, else the sorted labels, checked so that a
    typo cannot become a class of its own: every class needs training and test rows, and a
    validation row must name a training class."""
    lines: dict[str, dict[str, list[int]]] = {}
    for _, label, split, line in rows:
        lines.setdefault(label, {}).setdefault(split, []).append(line)

    def where(label: str) -> str:
        found = lines[label]
        return "; ".join(f"{s} on line(s) {', '.join(map(str, found[s][:5]))}" for s in SPLITS if s in found)

    if cfg.classnames_file:
        cls_file = root / cfg.classnames_file
        if not cls_file.is_file():
            raise FileNotFoundError(f"data.classnames_file {cls_file} does not exist (one class name per line)")
        labels = [ln.strip() for ln in cls_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        stray = [label for label in lines if label not in labels]
        if stray:
            raise ValueError(f"{file}: label {stray[0]!r} is not in {cls_file} ({where(stray[0])})"
                             + (f", and {len(stray) - 1} more unknown label(s)" if len(stray) > 1 else "")
                             + "; fix the label or add the class to the class-list file")
        return labels
    labels = sorted(lines)
    for label in labels:
        absent = [s for s in ("train", "test") if s not in lines[label]]
        if absent or ("val" in lines[label] and "train" not in lines[label]):
            missing = " and ".join(absent) or "train"
            raise ValueError(
                f"{file}: class {label!r} has no {missing} rows but appears in {where(label)}; a "
                "misspelt label becomes a class of its own. Fix the label, or list the classes in "
                "data.classnames_file")
    return labels


# ------------------------------------------------------------------------------------------ zhou
def _zhou_split_file(root: Path, split_file: Optional[str]) -> Path:
    if split_file:
        file = root / split_file
        if not file.is_file():
            raise FileNotFoundError(f"split file {file} does not exist; the zhou dataset expects {ZHOU_LAYOUT}")
        return file
    # no name given: the community's files are called split_zhou_<Dataset>.json; take the only one
    found = sorted(root.glob("split_zhou_*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"set data.split_file: found {len(found)} split_zhou_*.json files in {root} "
                                f"({', '.join(p.name for p in found) or 'none'}); expected {ZHOU_LAYOUT}")
    return found[0]


def _image_prefix(root: Path, probes: list[str], file: Path) -> str:
    """The folder inside root that the split file's paths are relative to ("" for root itself).

    CoOp's datasets keep their images in a subfolder (``images/``, ``jpg/``, ``2750/``, ...) while the
    JSON paths start below it; probing a few entries finds it without a config key per dataset.
    """
    subdirs = _subdirs(root)
    preferred = sorted(subdirs, key=lambda d: (d.name not in ("images", "jpg"), d.name))
    candidates = [""] + [d.name + "/" for d in preferred]
    for probe in probes:
        for prefix in candidates:
            if (root / (prefix + probe)).is_file():
                return prefix
    raise FileNotFoundError(
        f"{file}: cannot find image {probes[0]!r} under {root} nor under any folder inside it "
        f"({', '.join(d.name for d in subdirs) or 'none'}); paths in the split file must be relative "
        f"to data.root or to one folder inside it")


def _zhou_rows(root: Path, file: Path, data: dict, split: str) -> list[tuple[str, int, str]]:
    rows = data.get(split, [])
    if not isinstance(rows, list):
        raise ValueError(f"{file}: {split!r} must be a list of [relative_path, label, classname]")
    out = []
    for i, row in enumerate(rows):
        ok = (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)
              and isinstance(row[1], int) and not isinstance(row[1], bool) and row[1] >= 0
              and isinstance(row[2], str))
        if not ok:
            raise ValueError(f"{file}: {split}[{i}] = {row!r} is not [relative_path, label, classname]")
        out.append((_relative(root, row[0]), row[1], row[2]))
    return out


@register_dataset("zhou")
def load_zhou(cfg: DataConfig) -> DatasetSplits:
    """The CoOp / CoCoOp split JSON (``split_zhou_<Name>.json``) over images under ``data.root``."""
    root = dataset_root(cfg, ZHOU_LAYOUT)
    file = _zhou_split_file(root, cfg.split_file)
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); expected {ZHOU_LAYOUT}") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise ValueError(f"{file} needs 'train' and 'test' lists; expected {ZHOU_LAYOUT}")
    rows = {s: _zhou_rows(root, file, data, s) for s in SPLITS}
    names: dict[int, str] = {}
    for s in SPLITS:
        for path, label, name in rows[s]:
            if names.setdefault(label, name) != name:
                raise ValueError(f"{file}: label {label} is called both {names[label]!r} and {name!r}")
    missing = sorted(set(range(max(names) + 1)) - set(names)) if names else []
    if not names or missing:
        raise ValueError(f"{file}: labels must be 0..n-1 with every id used; missing {missing[:10]}")
    # probe the first entry of each split, so one absent file does not hide the layout
    probes = [rows[s][0][0] for s in SPLITS if rows[s]]
    prefix = _image_prefix(root, probes, file)
    splits = {s: [Item(prefix + p if not os.path.isabs(p) else p, label) for p, label, _ in rows[s]]
              for s in SPLITS}
    name = file.stem.removeprefix("split_zhou_") or "zhou"
    # a community split file (split_zhou_OxfordPets.json) brings its dataset's template
    from adapt.data.meta import templates_by_name

    return DatasetSplits(name=name, root=root,
                         classnames=[clean_classname(names[i]) for i in range(len(names))],
                         templates=dataset_templates(cfg, templates_by_name(name) or [DEFAULT_TEMPLATE]),
                         **splits)


def unlabelled_folder_paths(folder: str) -> list[str]:
    """Every image under ``folder`` (recursive, sorted), as absolute paths (an item path that is
    absolute is read as it is, whatever the dataset's root)."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"data.unlabelled.folder={folder}: no such folder; give a folder of unlabelled images")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"data.unlabelled.folder={folder}: no image files "
                         f"({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) under it")
    return files
