"""The CoOp protocol's datasets in the community's on-disk layouts (CoOp's DATASETS.md).

Each loader is registered under the community's name (``oxford_pets``, ``caltech101``, ...) and
reads ``split_zhou_<Name>.json`` from the dataset's folder. ``data.root`` may be that folder or
the parent that holds it under its usual name (``DATA/oxford_pets``), so one root serves every
dataset of a cross-dataset recipe. When the split file is absent it is generated from the raw
annotations the protocol's way (ratios and renaming rules of CoOp's dataset code) with a fixed
seed, and written atomically beside the data if that folder is writable, else into adapt's
cache, so the next run reuses it. Class-name rules and templates are data files in ``meta/``.

Deliberate departures from CoOp's code, all for determinism: a generated split lists files and
folders in sorted order (the original uses ``os.listdir`` order) and shuffles with its own
``random.Random(1)`` (the original uses the global stream of whichever run generated it).
The community's published split files are read as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from adapt.data.config import DataConfig
from adapt.data.folder import IMAGE_EXTENSIONS, clean_classname, dataset_root, dataset_templates
from adapt.data.items import DatasetSplits, Item
from adapt.data.meta import dataset_meta
from adapt.data.registry import register_dataset, register_table_entry
from adapt.io import atomic_write_json

Row = tuple[str, int, str]  # (path relative to the image folder, label, class name)
Rows = dict[str, list[Row]]
SPLIT_SEED = 1


@dataclass(frozen=True)
class Benchmark:
    name: str  # registry key and meta/<name>.json
    folder: str  # the dataset's folder name in the community layout
    image_dir: str  # folder (inside the dataset folder) the split file's paths start from
    split_file: str
    generate: Callable[[Path, dict, random.Random], Rows]  # (dataset folder, meta, rng) -> rows
    sources: str  # what generation reads, for the error message

    def layout(self) -> str:
        return (f"root/{self.folder}/{self.split_file} with the images under "
                f"root/{self.folder}/{self.image_dir or '.'} (or {self.sources} to generate the split); "
                f"data.root may also be the {self.folder} folder itself")


def locate(cfg: DataConfig, folder: str, layout: str) -> Path:
    """The dataset's own folder: ``data.root/<folder>`` when present, else ``data.root``."""
    root = dataset_root(cfg, layout)
    return root / folder if (root / folder).is_dir() else root


def splits_from_rows(name: str, root: Path, rows: Rows, templates: list[str], image_dir: str,
                     what: str) -> DatasetSplits:
    names: dict[int, str] = {}
    for split in rows.values():
        for _, label, cname in split:
            if names.setdefault(label, cname) != cname:
                raise ValueError(f"{what}: label {label} is called both {names[label]!r} and {cname!r}")
    if not names or sorted(names) != list(range(len(names))):
        raise ValueError(f"{what}: labels must be 0..n-1 with every id used")
    prefix = f"{image_dir}/" if image_dir else ""
    # the images themselves are checked where they are selected (data module, adapt/data/checks.py)
    splits = {s: [Item(prefix + p, label) for p, label, _ in rows.get(s, [])] for s in ("train", "val", "test")}
    return DatasetSplits(name=name, root=root, classnames=[clean_classname(names[i]) for i in range(len(names))],
                         templates=templates, **splits)


# ---------------------------------------------------------------------------- split files ---
def cache_root() -> Path:
    """``$ADAPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adapt``, else ``~/.cache/adapt``."""
    if os.environ.get("ADAPT_CACHE_DIR"):
        return Path(os.environ["ADAPT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "adapt"


def cached_split_path(folder: Path, split_file: str) -> Path:
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    return cache_root() / "splits" / f"{folder.name}-{digest}" / split_file


def read_split_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to regenerate it, or restore "
                         f"the community's copy") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise ValueError(f"{path} needs 'train', 'val' and 'test' lists of [path, label, classname]")
    out: Rows = {}
    for split in ("train", "val", "test"):
        rows = data.get(split, [])
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and isinstance(row[1], int) and isinstance(row[2], str)):
                raise ValueError(f"{path}: {split}[{i}] = {row!r} is not [relative_path, label, classname]")
        out[split] = [(r[0], r[1], r[2]) for r in rows]
    return out


def split_rows(bench: Benchmark, folder: Path, split_file: Optional[str] = None) -> tuple[Rows, Path]:
    """The split's rows and the file they came from: beside the data, else adapt's cache, else
    generated (and written to the first of those two that is writable)."""
    name = split_file or bench.split_file
    beside, cached = folder / name, cached_split_path(folder, name)
    for path in (beside, cached):
        if path.is_file():
            return read_split_json(path), path
    if split_file:
        raise FileNotFoundError(f"split file {beside} does not exist (data.split_file); drop "
                                f"data.split_file to use or generate {bench.split_file}")
    try:
        rows = bench.generate(folder, dataset_meta(bench.name), random.Random(SPLIT_SEED))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{bench.name}: neither {beside} nor the files to generate it exist "
                                f"({err}). Expected {bench.layout()}") from None
    target = beside if os.access(folder, os.W_OK) else cached
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target, rows, indent=None)
    return rows, target


def load_benchmark(bench: Benchmark, cfg: DataConfig) -> DatasetSplits:
    folder = locate(cfg, bench.folder, bench.layout())
    rows, path = split_rows(bench, folder, cfg.split_file)
    templates = dataset_templates(cfg, dataset_meta(bench.name)["templates"])
    return splits_from_rows(bench.name, folder, rows, templates, bench.image_dir, str(path))


# ----------------------------------------------------------------- generation, per dataset ---
def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return path


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def split_trainval(trainval: list[Row], rng: random.Random, p_val: float = 0.2) -> tuple[list[Row], list[Row]]:
    """CoOp's ``split_trainval``: per label (first-appearance order), shuffle, the first
    round(n * p_val) go to val."""
    by_label: dict[int, list[int]] = {}
    for i, row in enumerate(trainval):
        by_label.setdefault(row[1], []).append(i)
    train, val = [], []
    for idx in by_label.values():
        n_val = round(len(idx) * p_val)
        if n_val == 0:
            raise ValueError(f"class {trainval[idx[0]][2]!r} has too few images ({len(idx)}) for a val split")
        rng.shuffle(idx)
        val += [trainval[i] for i in idx[:n_val]]
        train += [trainval[i] for i in idx[n_val:]]
    return train, val


def split_per_class(groups: list[tuple[int, str, list[str]]], rng: random.Random,
                    p_trn: float = 0.5, p_val: float = 0.2) -> Rows:
    """CoOp's ``read_and_split_data``: per class shuffle, then 50% train, 20% val, the rest test."""
    out: Rows = {"train": [], "val": [], "test": []}
    for label, cname, paths in groups:
        paths = list(paths)
        rng.shuffle(paths)
        n_trn, n_val = round(len(paths) * p_trn), round(len(paths) * p_val)
        if n_trn == 0 or n_val == 0 or len(paths) - n_trn - n_val == 0:
            raise ValueError(f"class {cname!r} has too few images ({len(paths)}) for a 50/20/30 split")
        for split, part in (("train", paths[:n_trn]), ("val", paths[n_trn:n_trn + n_val]),
                            ("test", paths[n_trn + n_val:])):
            out[split] += [(p, label, cname) for p in part]
    return out


def gen_class_folders(image_dir: str) -> Callable[[Path, dict, random.Random], Rows]:
    def generate(folder: Path, meta: dict, rng: random.Random) -> Rows:
        images = _need(folder / image_dir)
        ignore, rename = set(meta.get("ignore", ())), meta.get("rename", {})
        cats = sorted(d.name for d in images.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in ignore)
        groups = [(i, rename.get(c, c), [f"{c}/{f}" for f in _files(images / c)]) for i, c in enumerate(cats)]
        return split_per_class(groups, rng)
    return generate


def gen_pets(folder: Path, meta: dict, rng: random.Random) -> Rows:
    def read(name: str) -> list[Row]:
        rows = []
        for line in _need(folder / "annotations" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                stem, label = line.split()[:2]
                rows.append((f"{stem}.jpg", int(label) - 1, "_".join(stem.split("_")[:-1]).lower()))
        return rows
    train, val = split_trainval(read("trainval.txt"), rng)
    return {"train": train, "val": val, "test": read("test.txt")}


def _loadmat(path: Path):
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"reading {path} needs scipy (pip install scipy), or put the community's "
                          f"split_zhou_*.json beside it") from None
    return loadmat(str(_need(path)))


def gen_flowers(folder: Path, meta: dict, rng: random.Random) -> Rows:
    labels = _loadmat(folder / "imagelabels.mat")["labels"][0]
    names = json.loads(_need(folder / "cat_to_name.json").read_text())
    by_label: dict[int, list[str]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(f"image_{i + 1:05d}.jpg")
    return split_per_class([(y - 1, names[str(y)], paths) for y, paths in by_label.items()], rng)


def gen_cars(folder: Path, meta: dict, rng: random.Random) -> Rows:
    classes = [c[0] for c in _loadmat(folder / "devkit" / "cars_meta.mat")["class_names"][0]]
    renamed = [" ".join([c.split(" ")[-1]] + c.split(" ")[:-1]) for c in classes]  # year to the front

    def read(image_dir: str, anno: Path) -> list[Row]:
        return [(f"{image_dir}/{a['fname'][0]}", int(a["class"][0, 0]) - 1, renamed[int(a["class"][0, 0]) - 1])
                for a in _loadmat(anno)["annotations"][0]]
    train, val = split_trainval(read("cars_train", folder / "devkit" / "cars_train_annos.mat"), rng)
    return {"train": train, "val": val, "test": read("cars_test", folder / "cars_test_annos_withlabels.mat")}


def gen_sun(folder: Path, meta: dict, rng: random.Random) -> Rows:
    classes = [ln.strip()[1:] for ln in _need(folder / "ClassName.txt").read_text().splitlines() if ln.strip()]
    index = {c: i for i, c in enumerate(classes)}

    def read(name: str) -> list[Row]:
        rows = []
        for line in _need(folder / name).read_text().splitlines():
            if line.strip():
                path = line.strip()[1:]
                cls = os.path.dirname(path)
                rows.append((path, index[cls], " ".join(cls.split("/")[1:][::-1])))  # drop the letter, reverse
        return rows
    train, val = split_trainval(read("Training_01.txt"), rng)
    return {"train": train, "val": val, "test": read("Testing_01.txt")}


def gen_ucf(folder: Path, meta: dict, rng: random.Random) -> Rows:
    lists = folder / "ucfTrainTestlist"
    index = {}
    for line in _need(lists / "classInd.txt").read_text().splitlines():
        if line.strip():
            label, action = line.split()
            index[action] = int(label) - 1

    def read(name: str) -> list[Row]:
        rows = []
        for line in _need(lists / name).read_text().splitlines():
            if line.strip():
                action, file = line.split()[0].split("/")
                renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))  # CamelCase -> words
                rows.append((f"{renamed}/{file.replace('.avi', '.jpg')}", index[action], renamed))
        return rows
    train, val = split_trainval(read("trainlist01.txt"), rng)
    return {"train": train, "val": val, "test": read("testlist01.txt")}


BENCHMARKS = {b.name: b for b in (
    Benchmark("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
              gen_class_folders("101_ObjectCategories"), "101_ObjectCategories/<class>/"),
    Benchmark("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", gen_pets,
              "annotations/trainval.txt + test.txt"),
    Benchmark("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", gen_cars,
              "devkit/cars_meta.mat, cars_train_annos.mat, cars_test_annos_withlabels.mat"),
    Benchmark("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", gen_flowers,
              "imagelabels.mat + cat_to_name.json"),
    Benchmark("food101", "food-101", "images", "split_zhou_Food101.json", gen_class_folders("images"),
              "images/<class>/"),
    Benchmark("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", gen_sun,
              "ClassName.txt + Training_01.txt + Testing_01.txt"),
    Benchmark("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", gen_class_folders("images"),
              "images/<class>/"),
    Benchmark("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", gen_class_folders("2750"),
              "2750/<class>/"),
    Benchmark("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", gen_ucf,
              "ucfTrainTestlist/classInd.txt + trainlist01.txt + testlist01.txt"),
)}


for _bench in BENCHMARKS.values():
    register_table_entry(_bench.name, load_benchmark, _bench, f"{dataset_meta(_bench.name)['name']}: {_bench.layout()}.")


# ------------------------------------------------------------------ FGVCAircraft: no JSON ---
AIRCRAFT_LAYOUT = ("root/fgvc_aircraft/variants.txt, images_variant_{train,val,test}.txt and "
                   "images/<id>.jpg (the official release's data/ folder, renamed fgvc_aircraft)")


@register_dataset("fgvc_aircraft")
def load_fgvc_aircraft(cfg: DataConfig) -> DatasetSplits:
    """FGVCAircraft from its official list files; labels in ``variants.txt`` order."""
    folder = locate(cfg, "fgvc_aircraft", AIRCRAFT_LAYOUT)
    variants = folder / "variants.txt"
    if not variants.is_file():
        raise FileNotFoundError(f"{variants} is missing; expected {AIRCRAFT_LAYOUT}")
    classes = [ln.strip() for ln in variants.read_text().splitlines() if ln.strip()]
    index = {c: i for i, c in enumerate(classes)}
    rows: Rows = {}
    for split in ("train", "val", "test"):
        file = folder / f"images_variant_{split}.txt"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; expected {AIRCRAFT_LAYOUT}")
        rows[split] = []
        for n, line in enumerate(file.read_text().splitlines(), start=1):
            if line.strip():
                image, cname = line.strip().split(" ", 1)
                if cname not in index:
                    raise ValueError(f"{file}, line {n}: variant {cname!r} is not in {variants}")
                rows[split].append((f"{image}.jpg", index[cname], cname))
    templates = dataset_templates(cfg, dataset_meta("fgvc_aircraft")["templates"])
    return splits_from_rows("fgvc_aircraft", folder, rows, templates, "images", str(folder / "images_variant_*.txt"))
