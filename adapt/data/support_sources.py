"""Making the support set ``data.support`` declares (``adapt/data/support.py``): a user's folder
matched to the classes here, the world's rendered sets and retrieval pool in
``adapt/data/world/support.py``; every problem one message naming the field and the fix."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

from adapt.data.checks import check_images
from adapt.data.class_text import _few, normalised
from adapt.data.folder import IMAGE_EXTENSIONS, _subdirs
from adapt.data.items import Item
from adapt.data.support import SupportConfig, SupportSet, counts_report
from adapt.data.world import support as world


def check_support(cfg: SupportConfig, dataset_name: str, classnames: Sequence[str], descriptions: Optional[str],
                  bad_images: str = "error"):
    """The declared support set made ready before any model loads: a folder's items, the world's
    rendered images, the retrieval pool (ranked later, with the model: ``retrieve``); None when
    nothing is declared or the source is the training split. Raises ValueError naming the fix."""
    if cfg.source is None:
        if cfg.folder:
            raise ValueError(f"data.support.folder={cfg.folder} is given but data.support.source is null: "
                             "set data.support.source=folder")
        return None
    if cfg.source == "folder":
        return folder_support(cfg, classnames, bad_images)
    if cfg.folder:
        raise ValueError(f"data.support.folder is read only with data.support.source=folder, not {cfg.source}: "
                         "drop it, or set source=folder")
    if cfg.source == "train":
        return None
    if cfg.source == "world":
        return world.rendered_support(cfg, dataset_name, classnames)
    if cfg.prompt == "descriptions" and not descriptions:
        raise ValueError("data.support.prompt=descriptions queries the pool with each class's description "
                         "sentences, and none are given: set data.class_text.descriptions (a JSON file of "
                         "sentences per class), or use data.support.prompt=photo")
    return world.retrieval_pool(cfg, dataset_name, classnames)


def folder_support(cfg: SupportConfig, classnames: Sequence[str], bad_images: str) -> SupportSet:
    """``<folder>/<class>/*`` matched to ``classnames``: at most ``per_class`` images of each (a
    seeded draw when a class has more), every class present, no other folder."""

    root = Path(str(cfg.folder)).expanduser() if cfg.folder else None
    where = f"data.support.folder={cfg.folder}"
    if root is None or not root.is_dir():
        raise ValueError(f"{where}: {'not given' if root is None else 'no such folder'}; give a folder with "
                         "one subfolder of images per class (<folder>/<class>/*.png), e.g. images generated "
                         "with Stable Diffusion or retrieved from LAION for each class name")
    wanted = {normalised(c): i for i, c in enumerate(classnames)}
    folders = {normalised(d.name): d for d in _subdirs(root)}
    unknown = sorted(d.name for key, d in folders.items() if key not in wanted)
    missing = [c for c in classnames if normalised(c) not in folders]
    if unknown or missing:
        raise ValueError(f"{where}: its class folders do not match the dataset's {len(classnames)} classes "
                         f"(not classes: {_few(unknown) or 'none'}; classes without a folder: "
                         f"{_few(missing) or 'none'}); name each subfolder after a class (compared in lower "
                         "case, '_' as a space)")
    rng = random.Random(cfg.seed)
    items, empty = [], []
    for key, label in wanted.items():
        d = folders[key]
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            empty.append(d.name)
        if len(files) > cfg.per_class:  # a seeded draw, kept in file order
            files = sorted(rng.sample(files, cfg.per_class))
        items += [Item(p.relative_to(root).as_posix(), label) for p in files]
    if empty:
        raise ValueError(f"{where}: class folder(s) {_few(empty)} hold no images ({'/'.join(sorted(IMAGE_EXTENSIONS))})")
    items = check_images(root, {"support": items}, bad_images)["support"]
    return SupportSet("folder", root, items, list(classnames), report=counts_report(items, len(classnames)))
