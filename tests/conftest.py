"""Shared fixtures: tiny open_clip backbones (random weights, no downloads) and generated images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from adapt.backbone import BackboneConfig, build_backbone

ASSETS = Path(__file__).parent / "assets"
open_clip.add_model_config(ASSETS / "model_configs")

CLASSES = ["red", "green", "blue", "yellow", "purple", "cyan"]
_RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
        "purple": (140, 30, 160), "cyan": (30, 210, 210)}


@pytest.fixture(scope="session", autouse=True)
def _private_feature_cache(tmp_path_factory):
    """Tests write cached features to a temporary folder, never the user's ~/.cache (the world's
    materialised images, deterministic and slow to make, stay shared)."""
    from adapt.data.world.build import cache_root

    mp = pytest.MonkeyPatch()
    mp.setenv("ADAPT_WORLD_CACHE", str(cache_root()))  # resolved before ADAPT_CACHE_DIR moves
    mp.setenv("ADAPT_CACHE_DIR", str(tmp_path_factory.mktemp("adapt_cache")))
    yield
    mp.undo()


def make_backbone(name: str = "adapt-tiny-vit", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_backbone(BackboneConfig(name=name, pretrained=None, **kw))


@pytest.fixture(scope="session")
def tiny_backbone():
    return make_backbone()


def write_image_folder(root: Path, classes=CLASSES, per_split=None, size: int = 32, seed: int = 0) -> Path:
    """An imagefolder dataset whose classes are colours (learnable by a linear map on pixels)."""
    per_split = per_split or {"train": 8, "val": 4, "test": 6}
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.array(_RGB[c], dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def multilabel_folder(image_folder) -> Path:
    """The image folder's files as multi-label data (``multilabel_csv``): each image shows its
    folder's class and, every other image, the next class too."""
    rows = ["path,labels,split"]
    for split in ("train", "val", "test"):
        for c, name in enumerate(CLASSES):
            for i, p in enumerate(sorted((image_folder / split / name).glob("*.png"))):
                names = [name] + ([CLASSES[(c + 1) % len(CLASSES)]] if i % 2 else [])
                rows.append(f"images/{p.relative_to(image_folder).as_posix()},{';'.join(names)},{split}")
    csv = image_folder.parent / f"{image_folder.name}-multilabel"
    csv.mkdir(exist_ok=True)
    (csv / "data.csv").write_text("\n".join(rows) + "\n")
    if not (csv / "images").exists():
        (csv / "images").symlink_to(image_folder)
    return csv


@pytest.fixture(scope="session")
def segmentation_folder(image_folder) -> Path:
    """The image folder's files as segmentation data (``segmentation_csv``): each image's label
    map is its folder's class, with a 4-pixel ignored (255) border."""
    root = image_folder.parent / f"{image_folder.name}-segmentation"
    rows = ["path,mask,split"]
    for split in ("train", "val", "test"):
        for c, name in enumerate(CLASSES):
            for p in sorted((image_folder / split / name).glob("*.png")):
                rel = p.relative_to(image_folder).as_posix()
                mask = np.full((32, 32), 255, np.uint8)
                mask[4:-4, 4:-4] = c
                (root / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask, mode="L").save(root / "masks" / rel)
                rows.append(f"images/{rel},masks/{rel},{split}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    if not (root / "images").exists():
        (root / "images").symlink_to(image_folder)
    return root


def tiny_overrides(root: Path, out: Path, method: str = "coop", **extra) -> list[str]:
    """Overrides that turn any recipe into a seconds-long CPU run on the generated images."""
    items = {
        "backbone.name": "adapt-tiny-vit", "backbone.pretrained": "null",
        "data.dataset": "imagefolder", "data.root": str(root), "data.shots": 4,
        "data.batch_size": 8, "data.num_workers": 0, "trainer.max_epochs": 2,
        "trainer.max_steps": "null",  # step-counting recipes (LoRA's 500 per shot) count epochs here
        "trainer.progress_bar": "false", "logger.csv": "false", "output_dir": str(out),
        "method.name": method,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


# a class tree over CLASSES (data.hierarchy), for the methods that require one (ProTeCt), and
# class text for them (data.class_text: CuPL's descriptions, VCD's descriptors)
COLOUR_TREE = ASSETS / "colour_tree.json"
COLOUR_DESCRIPTIONS = ASSETS / "colour_descriptions.json"
COLOUR_DESCRIPTORS = ASSETS / "colour_descriptors.json"
COLOUR_CAPTIONS = ASSETS / "colour_captions.txt"  # a caption corpus (data.captions: TaI-DPT)
REQUIRED_DATA = {"hierarchy": str(COLOUR_TREE), "class_text.descriptions": str(COLOUR_DESCRIPTIONS),
                 "class_text.descriptors": str(COLOUR_DESCRIPTORS), "captions.file": str(COLOUR_CAPTIONS),
                 "unlabelled.prior": "uniform"}
REQUIRED_DATA["support.source"] = "train"  # SuS-X's support set: the few-shot images (tests/test_susx.py: the rest)


def required_data(method: str) -> dict:
    """The data fields ``method`` cannot run without (``Method.requires_data``), set to test data."""
    from adapt.methods import get_method

    return {field: REQUIRED_DATA[field] for field in get_method(method).requires_data}


def required_build(method: str, classnames) -> dict:
    """``build_method`` keywords giving ``method`` its required data: the task's options (a class
    tree) as ``task_options``, the class text (checked for ``classnames``) as ``class_text``."""
    from adapt.data.class_text import ClassTextConfig, load_class_text

    need = required_data(method)
    text = {k.split(".", 1)[1]: v for k, v in need.items() if k.startswith("class_text.")}
    return {"task_options": {k: v for k, v in need.items() if "." not in k},  # captions: read by the data
            "class_text": load_class_text(ClassTextConfig(**text), classnames) if text else None}


@pytest.fixture(scope="session")
def tiny_datamodule(image_folder, tiny_backbone):
    from adapt.data import DataConfig
    from adapt.datamodule import AdaptDataModule

    dm = AdaptDataModule(DataConfig(dataset="imagefolder", root=str(image_folder), shots=4, batch_size=8,
                                    num_workers=0), tiny_backbone.image_size, tiny_backbone.image_mean,
                         tiny_backbone.image_std, seed=1)
    dm.setup()
    return dm
