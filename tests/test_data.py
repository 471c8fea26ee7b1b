"""The data layer: loaders, K-shot sampling, base/novel splits, manifests, the DataModule.

All data is generated here as tiny 8x8 PNGs; no test needs a backbone.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from adapt.data import (DataConfig, Item, build_dataset, few_shot_splits, read_manifest, sample_few_shot,
                        sample_validation, subsample_classes, write_manifest)
from adapt.datamodule import AdaptDataModule
from adapt.data.image_dataset import ImageDataset
from adapt.data import transforms

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 30)).save(path)
    return path


def make_folder(root: Path, classes=("b_cls", "a_cls", "c_cls"), counts=None) -> Path:
    counts = counts or {"train": 5, "val": 2, "test": 3}
    for split, n in counts.items():
        for c in classes:
            for i in range(n):
                png(root / split / c / f"{i}.png", 10 * i)
    return root


def items_of(n_classes: int, per_class: int) -> list[Item]:
    return [Item(f"c{c}/{i}.png", c) for c in range(n_classes) for i in range(per_class)]


# ----------------------------------------------------------------------------------- sampling
def test_few_shot_is_deterministic_per_seed_and_ignores_global_rng():
    items = items_of(4, 10)
    random.seed(0)
    a = sample_few_shot(items, 3, seed=1)
    random.seed(12345)
    random.random()
    assert sample_few_shot(items, 3, seed=1) == a


def test_few_shot_differs_across_seeds():
    items = items_of(4, 10)
    assert sample_few_shot(items, 3, seed=1) != sample_few_shot(items, 3, seed=2)


def test_few_shot_draws_exactly_k_distinct_items_per_class():
    items = items_of(5, 9)
    out = sample_few_shot(items, 4, seed=3)
    assert len(set(out)) == len(out) == 20
    assert set(out) <= set(items)
    for c in range(5):
        assert sum(it.label == c for it in out) == 4
    assert sample_few_shot(items, 0, seed=3) == items  # k <= 0: everything


def test_few_shot_too_few_images_raises_naming_class_and_fix():
    items = items_of(3, 5) + [Item("short/0.png", 3), Item("short/1.png", 3)]
    with pytest.raises(ValueError, match=r"'dog' has 2.*data.shots.*allow_fewer_shots=true"):
        sample_few_shot(items, 4, seed=1, classnames=["a", "b", "c", "dog"])
    out = sample_few_shot(items, 4, seed=1, allow_fewer=True)
    assert [it for it in out if it.label == 3] == items[-2:]
    assert len(out) == 3 * 4 + 2


def test_validation_takes_min_k_4_per_class():
    items = items_of(3, 6)
    assert len(sample_validation(items, 16, seed=1)) == 3 * 4
    assert len(sample_validation(items, 2, seed=1)) == 3 * 2
    assert len(sample_validation(items_of(3, 3), 16, seed=1)) == 3 * 3  # fewer is fine here


# ------------------------------------------------------------------------------- base / novel
@pytest.mark.parametrize("n, base, novel", [(5, [0, 1, 2], [3, 4]), (6, [0, 1, 2], [3, 4, 5])])
def test_base_novel_split_rule(n, base, novel):
    names = [f"class{i}" for i in range(n)]
    items = items_of(n, 2)
    b_items, b_names = subsample_classes(items, names, "base")
    n_items, n_names = subsample_classes(items, names, "novel")
    assert b_names == [names[i] for i in base] and n_names == [names[i] for i in novel]
    assert b_items == [Item(it.path, it.label) for it in items if it.label in base]
    # novel relabelled to 0..k-1 in sorted order, paths kept
    assert n_items == [Item(it.path, it.label - len(base)) for it in items if it.label in novel]
    assert subsample_classes(items, names, "all") == (items, names)
    with pytest.raises(ValueError, match="novel"):
        subsample_classes(items, names, "new")


# ---------------------------------------------------------------------------------- manifests
def test_manifest_round_trip_and_reuse(tmp_path):
    root = make_folder(tmp_path / "ds")
    ds = build_dataset(DataConfig(dataset="imagefolder", root=str(root)))
    train, val = few_shot_splits(ds, 2, seed=7)
    path = write_manifest(tmp_path / "run" / "manifest.json", ds.name, ds.classnames, train, val,
                          shots=2, seed=7, setting="all")
    m = read_manifest(path)
    assert (m.dataset, m.classnames, m.train, m.val, m.shots, m.seed, m.setting) == \
           (ds.name, ds.classnames, train, val, 2, 7, "all")
    assert all(not Path(it.path).is_absolute() for it in m.train)
    # reuse: a different seed still yields the manifest's images
    assert few_shot_splits(ds, 2, seed=99, manifest=path) == (train, val)
    assert few_shot_splits(ds, 2, seed=99) != (train, val)
    with pytest.raises(ValueError, match="data.shots=2"):
        few_shot_splits(ds, 4, seed=7, manifest=path)


def test_manifest_with_other_classes_is_refused(tmp_path):
    ds = build_dataset(DataConfig(dataset="imagefolder", root=str(make_folder(tmp_path / "ds"))))
    path = write_manifest(tmp_path / "m.json", "other", ["x", "y", "z"], [], [], 2, 1, "all")
    with pytest.raises(ValueError, match=r"class list.*differs.*'x' vs 'a cls'"):
        few_shot_splits(ds, 2, seed=1, manifest=path)


# ------------------------------------------------------------------------------------ loaders
def test_imagefolder_loader(tmp_path):
    root = make_folder(tmp_path / "ds", counts={"train": 2, "test": 1})
    ds = build_dataset(DataConfig(dataset="imagefolder", root=str(root)))
    assert ds.classnames == ["a cls", "b cls", "c cls"]
    assert ds.templates == ["a photo of a {}."]
    assert ds.val == []
    assert ds.train[:2] == [Item("train/a_cls/0.png", 0), Item("train/a_cls/1.png", 0)]
    assert ds.test == [Item(f"test/{c}/0.png", i) for i, c in enumerate(["a_cls", "b_cls", "c_cls"])]
    (root / "train" / "b_cls" / "notes.txt").write_text("ignored")
    png(root / "train" / "b_cls" / "UPPER.JPG")  # JPG spelled upper case still counts
    ds = build_dataset(DataConfig(dataset="imagefolder", root=str(root), templates=["{} here."]))
    assert Item("train/b_cls/UPPER.JPG", 1) in ds.train and len(ds.train) == 7
    assert ds.templates == ["{} here."]


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*train/<class>"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "nowhere")))
    root = make_folder(tmp_path / "ds", counts={"train": 1})
    with pytest.raises(FileNotFoundError, match=r"ds/test is missing"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(root)))
    make_folder(root, counts={"test": 1})
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train/empty holds no images"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(root)))


def test_csv_loader(tmp_path):
    root = tmp_path / "ds"
    rows = [("img/1.png", "zebra", "train"), ("img/2.png", "ant_eater", "train"),
            ("img/3.png", "zebra", "val"), ("img/4.png", "ant_eater", "test"), ("img/5.png", "zebra", "test")]
    for p, _, _ in rows:
        png(root / p)
    (root / "data.csv").write_text("path,label,split\n" + "".join(f"{p},{l},{s}\n" for p, l, s in rows))
    ds = build_dataset(DataConfig(dataset="csv", root=str(root)))
    assert ds.classnames == ["ant eater", "zebra"]
    assert ds.train == [Item("img/1.png", 1), Item("img/2.png", 0)]
    assert ds.val == [Item("img/3.png", 1)] and ds.test == [Item("img/4.png", 0), Item("img/5.png", 1)]
    (root / "bad.csv").write_text("file,class,split\nimg/1.png,zebra,train\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) path, label.*'path,label,split'"):
        build_dataset(DataConfig(dataset="csv", root=str(root), split_file="bad.csv"))


def test_zhou_loader_finds_the_image_subfolder(tmp_path):
    root = tmp_path / "dtd"
    split = {"train": [["banded/b1.jpg", 1, "banded"], ["blotchy/x.jpg", 0, "blotchy_thing"]],
             "val": [["banded/b2.jpg", 1, "banded"]],
             "test": [["blotchy/y.jpg", 0, "blotchy_thing"]]}
    for rows in split.values():
        for p, _, _ in rows:
            png(root / "images" / p)
    (root / "other").mkdir()
    (root / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    ds = build_dataset(DataConfig(dataset="zhou", root=str(root)))  # split file found by name
    assert ds.name == "DescribableTextures"
    assert ds.classnames == ["blotchy thing", "banded"]
    assert ds.train == [Item("images/banded/b1.jpg", 1), Item("images/blotchy/x.jpg", 0)]
    assert ds.test == [Item("images/blotchy/y.jpg", 0)]
    assert ds.templates == ["{} texture."]  # the DTD template, from meta/dtd.json
    ds = build_dataset(DataConfig(dataset="zhou", root=str(root), templates=["{} texture."],
                                  split_file="split_zhou_DescribableTextures.json"))
    assert ds.templates == ["{} texture."]
    (root / "s2.json").write_text(json.dumps({"train": [["nope/z.jpg", 0, "a"]], "test": []}))
    with pytest.raises(FileNotFoundError, match=r"cannot find image 'nope/z.jpg'"):
        build_dataset(DataConfig(dataset="zhou", root=str(root), split_file="s2.json"))


def test_misspelled_dataset_name_suggests_the_registered_one():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagefoldr'.*Did you mean 'imagefolder'"):
        build_dataset(DataConfig(dataset="imagefoldr", root="x"))


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    ds = ImageDataset([Item("good.png", 0), Item("broken.png", 1), Item("gone.png", 2)], tmp_path,
                      transforms.test_transform(8, MEAN, STD))
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 0
    with pytest.raises(OSError, match=r"cannot read image file .*broken\.png"):
        ds[1]
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        ds[2]


# --------------------------------------------------------------------------------- datamodule
def _module(tmp_path, setting, **kw):
    root = make_folder(tmp_path / "ds", classes=[f"k{i}" for i in range(5)], counts={"train": 4, "val": 5, "test": 2})
    cfg = DataConfig(dataset="imagefolder", root=str(root), setting=setting, shots=2, batch_size=4,
                     eval_batch_size=4, num_workers=0, **kw)
    dm = AdaptDataModule(cfg, image_size=16, mean=MEAN, std=STD, seed=1, run_dir=tmp_path / "run")
    dm.setup()
    return dm


def test_datamodule_base2novel(tmp_path):
    dm = _module(tmp_path, "base2novel")
    assert dm.eval_names() == ["base", "novel"]
    assert dm.train_classnames == ["k0", "k1", "k2"] == dm.eval_sets["base"][0]
    assert dm.eval_sets["novel"][0] == ["k3", "k4"]
    assert sorted({it.label for it in dm.eval_sets["novel"][1]}) == [0, 1]
    assert all(it.path.startswith(("test/k3/", "test/k4/")) for it in dm.eval_sets["novel"][1])
    assert len(dm.train_items) == 3 * 2 and len(dm.val_items) == 3 * 2
    # few-shot drawn over all classes first: the base items are those of the all-class sample
    m = read_manifest(tmp_path / "run" / "manifest.json")
    assert m.setting == "base2novel" and len(m.train) == 5 * 2
    assert dm.train_items == [it for it in m.train if it.label < 3]
    batches = list(dm.train_dataloader())
    assert len(batches) == 1  # 6 items, batch 4: the ragged last batch is dropped
    for x, y in batches:
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
        assert 0 <= int(y.min()) and int(y.max()) < 3
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and len(loaders[1].dataset) == 2 * 2
    x, y = next(iter(loaders[1]))
    assert x.shape == (4, 3, 16, 16) and int(y.max()) < 2


def test_datamodule_all_setting_and_empty_val(tmp_path):
    dm = _module(tmp_path, "all")
    assert list(dm.eval_sets) == ["test"] and dm.eval_sets["test"][0] == [f"k{i}" for i in range(5)]
    assert dm.templates == ["a photo of a {}."]
    assert len(dm.val_dataloader().dataset) == 5 * 2
    root = make_folder(tmp_path / "noval", counts={"train": 2, "test": 1})
    dm = AdaptDataModule(DataConfig(root=str(root), shots=1, num_workers=0), 8, MEAN, STD, seed=1)
    dm.setup()
    assert dm.val_items == [] and dm.val_dataloader() == []
    x, _ = next(iter(dm.train_dataloader()))  # 3 items < batch 32: the ragged batch is kept
    assert x.shape == (3, 3, 8, 8)
