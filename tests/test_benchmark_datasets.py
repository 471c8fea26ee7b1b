"""The CoOp protocol's datasets, each from a miniature copy of its on-disk layout (real file and
folder names, tiny images, small hand-written split and annotation files): class count and names
after the renaming rules, split sizes, labels, template; split generation and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapt.data import DataConfig, build_dataset
from adapt.data.meta import dataset_meta


def img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def load(name: str, root: Path, **kw):
    return build_dataset(DataConfig(dataset=name, root=str(root), **kw))


def zhou_split(folder: Path, file: str, image_dir: str, rows: dict) -> None:
    for split in rows.values():
        for path, _, _ in split:
            img(folder / image_dir / path)
    (folder / file).write_text(json.dumps(rows))


def labels(items):
    return [it.label for it in items]


# ----------------------------------------------------------------------- split-file datasets ---
def test_oxford_pets_split_file_names_template_and_parent_root(tmp_path):
    rows = {"train": [["Abyssinian_1.jpg", 0, "abyssinian"], ["american_bulldog_3.jpg", 1, "american_bulldog"]],
            "val": [["Abyssinian_2.jpg", 0, "abyssinian"]],
            "test": [["american_bulldog_9.jpg", 1, "american_bulldog"], ["Abyssinian_7.jpg", 0, "abyssinian"]]}
    zhou_split(tmp_path / "oxford_pets", "split_zhou_OxfordPets.json", "images", rows)
    for root in (tmp_path, tmp_path / "oxford_pets"):  # the parent of every dataset, or the folder itself
        ds = load("oxford_pets", root)
        assert ds.classnames == ["abyssinian", "american bulldog"]
        assert (len(ds.train), len(ds.val), len(ds.test)) == (2, 1, 2)
        assert ds.train[1].path == "images/american_bulldog_3.jpg" and labels(ds.test) == [1, 0]
        assert ds.templates == ["a photo of a {}, a type of pet."]
        assert ds.root == tmp_path / "oxford_pets"


def test_stanford_cars_paths_relative_to_the_dataset_folder(tmp_path):
    rows = {"train": [["cars_train/00001.jpg", 0, "2012 AM General Hummer SUV"]], "val": [],
            "test": [["cars_test/00001.jpg", 0, "2012 AM General Hummer SUV"],
                     ["cars_test/00002.jpg", 1, "2012 Acura RL Sedan"]]}
    zhou_split(tmp_path / "stanford_cars", "split_zhou_StanfordCars.json", "", rows)
    ds = load("stanford_cars", tmp_path)
    assert ds.classnames == ["2012 AM General Hummer SUV", "2012 Acura RL Sedan"]
    assert ds.test[1].path == "cars_test/00002.jpg" and ds.templates == ["a photo of a {}."]


@pytest.mark.parametrize("name,folder,file,image_dir,template", [
    ("caltech101", "caltech-101", "split_zhou_Caltech101.json", "101_ObjectCategories", "a photo of a {}."),
    ("oxford_flowers", "oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg", "a photo of a {}, a type of flower."),
    ("food101", "food-101", "split_zhou_Food101.json", "images", "a photo of {}, a type of food."),
    ("sun397", "sun397", "split_zhou_SUN397.json", "SUN397", "a photo of a {}."),
    ("dtd", "dtd", "split_zhou_DescribableTextures.json", "images", "{} texture."),
    ("eurosat", "eurosat", "split_zhou_EuroSAT.json", "2750", "a centered satellite photo of {}."),
    ("ucf101", "ucf101", "split_zhou_UCF101.json", "UCF-101-midframes", "a photo of a person doing {}."),
])
def test_split_file_datasets_read_the_community_file(tmp_path, name, folder, file, image_dir, template):
    rows = {"train": [["a/x1.jpg", 1, "Sea_or_Lake"], ["b/x2.jpg", 0, "Apply_Eye_Makeup"]],
            "val": [["a/x3.jpg", 1, "Sea_or_Lake"]], "test": [["b/x4.jpg", 0, "Apply_Eye_Makeup"]]}
    zhou_split(tmp_path / folder, file, image_dir, rows)
    ds = load(name, tmp_path)
    assert ds.classnames == ["Apply Eye Makeup", "Sea or Lake"]  # underscores -> spaces
    assert ds.train[0].path == f"{image_dir}/a/x1.jpg" and labels(ds.train) == [1, 0]
    assert ds.templates == [template]


# --------------------------------------------------------------------------- split generation ---
def _class_folders(image_root: Path, classes: dict[str, int]) -> None:
    for cls, n in classes.items():
        for i in range(n):
            img(image_root / cls / f"im_{i:03d}.jpg")


def test_caltech101_generation_drops_and_renames_classes_and_is_reused(tmp_path):
    _class_folders(tmp_path / "caltech-101/101_ObjectCategories",
                   {"BACKGROUND_Google": 10, "Faces": 10, "Faces_easy": 10, "airplanes": 10, "accordion": 20})
    ds = load("caltech101", tmp_path)
    assert ds.classnames == ["face", "accordion", "airplane"]  # sorted folder names: Faces, accordion, airplanes
    assert (len(ds.train), len(ds.val), len(ds.test)) == (5 + 5 + 10, 2 + 2 + 4, 3 + 3 + 6)  # 50/20/30
    split = tmp_path / "caltech-101/split_zhou_Caltech101.json"
    assert split.is_file()  # written beside the data
    assert load("caltech101", tmp_path).train == ds.train  # deterministic, and now read from the file
    split.unlink()
    assert load("caltech101", tmp_path).train == ds.train  # regenerated identically


def test_generated_split_goes_to_the_cache_when_the_folder_is_read_only(tmp_path, monkeypatch):
    import adapt.data.benchmark as bm

    _class_folders(tmp_path / "dtd/images", {"banded": 10, "blotchy": 10})
    monkeypatch.setattr(bm.os, "access", lambda path, mode: False)
    ds = load("dtd", tmp_path)
    assert not (tmp_path / "dtd/split_zhou_DescribableTextures.json").exists()
    cached = bm.cached_split_path(tmp_path / "dtd", "split_zhou_DescribableTextures.json")
    assert cached.is_file() and load("dtd", tmp_path).test == ds.test
    assert ds.classnames == ["banded", "blotchy"] and ds.templates == ["{} texture."]


def test_eurosat_generation_uses_readable_names(tmp_path):
    _class_folders(tmp_path / "eurosat/2750", {"AnnualCrop": 10, "SeaLake": 10})
    ds = load("eurosat", tmp_path)
    assert ds.classnames == ["Annual Crop Land", "Sea or Lake"]
    assert ds.train[0].path.startswith("2750/AnnualCrop/")


def test_oxford_pets_generation_from_annotations(tmp_path):
    folder = tmp_path / "oxford_pets"
    lines = {"trainval.txt": [f"Abyssinian_{i} 1 1 1" for i in range(10)] + [f"great_pyrenees_{i} 2 2 1" for i in range(5)],
             "test.txt": ["Abyssinian_50 1 1 1", "great_pyrenees_50 2 2 1"]}
    (folder / "annotations").mkdir(parents=True)
    for file, rows in lines.items():
        (folder / "annotations" / file).write_text("\n".join(rows) + "\n")
        for r in rows:
            img(folder / "images" / f"{r.split()[0]}.jpg")
    ds = load("oxford_pets", tmp_path)
    assert ds.classnames == ["abyssinian", "great pyrenees"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8 + 4, 2 + 1, 2)  # 20% val per class


def test_oxford_flowers_generation_from_mat_and_names(tmp_path):
    from scipy.io import savemat

    folder = tmp_path / "oxford_flowers"
    folder.mkdir()
    labels_ = [2] * 10 + [1] * 10
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels_])})
    (folder / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))
    for i in range(20):
        img(folder / "jpg" / f"image_{i + 1:05d}.jpg")
    ds = load("oxford_flowers", tmp_path)
    assert ds.classnames == ["pink primrose", "hard-leaved pocket orchid"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 6)
    assert {it.path for it in ds.train + ds.val + ds.test if it.label == 1} == {f"jpg/image_{i:05d}.jpg" for i in range(1, 11)}


def test_sun397_generation_reverses_path_parts(tmp_path):
    folder = tmp_path / "sun397"
    folder.mkdir()
    (folder / "ClassName.txt").write_text("/a/abbey\n/b/barn/outdoor\n")
    train = [f"/a/abbey/sun_{i}.jpg" for i in range(5)] + [f"/b/barn/outdoor/sun_{i}.jpg" for i in range(5)]
    test = ["/a/abbey/sun_9.jpg", "/b/barn/outdoor/sun_9.jpg"]
    (folder / "Training_01.txt").write_text("\n".join(train))
    (folder / "Testing_01.txt").write_text("\n".join(test))
    for p in train + test:
        img(folder / "SUN397" / p[1:])
    ds = load("sun397", tmp_path)
    assert ds.classnames == ["abbey", "outdoor barn"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 2, 2) and ds.test[1].path == "SUN397/b/barn/outdoor/sun_9.jpg"


def test_ucf101_generation_splits_camel_case(tmp_path):
    lists = tmp_path / "ucf101/ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    train = [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g0{i}_c01.avi 1" for i in range(5)] + \
            [f"YoYo/v_YoYo_g0{i}_c01.avi 2" for i in range(5)]
    (lists / "trainlist01.txt").write_text("\n".join(train))
    (lists / "testlist01.txt").write_text("YoYo/v_YoYo_g09_c01.avi\n")
    for name in ("Apply_Eye_Makeup", "Yo_Yo"):
        for i in range(10):
            img(tmp_path / "ucf101/UCF-101-midframes" / name / f"v_{name.replace('_', '')}_g0{i}_c01.jpg")
    ds = load("ucf101", tmp_path)
    assert ds.classnames == ["Apply Eye Makeup", "Yo Yo"]
    assert ds.test[0].path == "UCF-101-midframes/Yo_Yo/v_YoYo_g09_c01.jpg" and labels(ds.test) == [1]
    assert ds.templates == ["a photo of a person doing {}."]


def test_missing_raw_files_name_the_layout(tmp_path):
    (tmp_path / "sun397").mkdir()
    with pytest.raises(FileNotFoundError, match="ClassName.txt is missing.*split_zhou_SUN397.json"):
        load("sun397", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("food101", tmp_path / "nowhere")


def test_listed_but_absent_images_stop_with_count_and_fix(tmp_path):
    rows = {"train": [["a/1.jpg", 0, "a"], ["a/2.jpg", 0, "a"]], "val": [], "test": [["a/3.jpg", 0, "a"]]}
    zhou_split(tmp_path / "dtd", "split_zhou_DescribableTextures.json", "images", rows)
    (tmp_path / "dtd/images/a/2.jpg").unlink()
    from adapt.datamodule import AdaptDataModule

    dm = AdaptDataModule(DataConfig(dataset="dtd", root=str(tmp_path), shots=0), None, None, None, seed=1)
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed .*train: images/a/2.jpg"):
        dm.setup()


# ----------------------------------------------------------------------------- FGVCAircraft ---
def test_fgvc_aircraft_reads_variant_lists(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    folder.mkdir()
    (folder / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    lists = {"train": ["1000001 A300B4", "1000002 707-320"], "val": ["1000003 F/A-18"], "test": ["1000004 F/A-18"]}
    for split, rows in lists.items():
        (folder / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for r in rows:
            img(folder / "images" / f"{r.split()[0]}.jpg")
    ds = load("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4", "F/A-18"]  # variants.txt order
    assert labels(ds.train) == [1, 0] and ds.train[0].path == "images/1000001.jpg"
    assert ds.templates == ["a photo of a {}, a type of aircraft."]


# -------------------------------------------------------------------------------- ImageNet -----
WNIDS = sorted(dataset_meta("imagenet")["classnames"])


def test_shipped_imagenet_names_and_templates():
    meta = dataset_meta("imagenet")
    assert len(meta["classnames"]) == 1000 and meta["classnames"]["n01440764"] == "tench"
    assert meta["classnames"]["n15075141"] == "toilet paper"
    assert len(meta["ensemble"]) == 7 and meta["ensemble"][0] == "itap of a {}."
    for v in ("imagenet_a", "imagenet_r"):
        assert len(dataset_meta(v)["wnids"]) == 200 and set(dataset_meta(v)["wnids"]) <= set(WNIDS)


def test_imagenet_uses_val_as_test_and_readable_names(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for w in (WNIDS[1], WNIDS[0]):
            for i in range(n):
                img(tmp_path / "imagenet/images" / split / w / f"{w}_{i}.JPEG")
    ds = load("imagenet", tmp_path)
    assert ds.classnames == ["tench", "goldfish"] and ds.class_ids == WNIDS[:2]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 0, 4)
    assert ds.test[0].path == f"images/val/{WNIDS[0]}/{WNIDS[0]}_0.JPEG"
    assert ds.templates[0] == "a photo of a {}." and ds.templates[1:] == dataset_meta("imagenet")["ensemble"]
    (tmp_path / "imagenet/classnames.txt").write_text(f"{WNIDS[0]} my tench\n{WNIDS[1]} my goldfish\n")
    assert load("imagenet", tmp_path).classnames == ["my tench", "my goldfish"]  # the folder's own file wins


def test_imagenet_variants_labels_and_class_lists(tmp_path):
    img(tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val/1/a.jpeg")
    img(tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val/999/b.jpeg")
    v2 = load("imagenetv2", tmp_path)
    assert len(v2.classnames) == 1000 and labels(v2.test) == [1, 999] and v2.classnames[999] == "toilet paper"
    for w in (WNIDS[5], WNIDS[2]):
        img(tmp_path / "imagenet-sketch/images" / w / "sketch_0.JPEG")
    sk = load("imagenet_sketch", tmp_path)
    assert sk.class_ids == [WNIDS[2], WNIDS[5]] and labels(sk.test) == [0, 1]
    for key, folder, sub in (("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                             ("imagenet_r", "imagenet-rendition", "imagenet-r")):
        wnids = sorted(dataset_meta(key)["wnids"])
        img(tmp_path / folder / sub / wnids[10] / "x.jpg")
        img(tmp_path / folder / sub / wnids[0] / "y.jpg")
        (tmp_path / folder / sub / "README.txt").write_text("ignored")
        ds = load(key, tmp_path)
        assert len(ds.classnames) == 200 and ds.class_ids == wnids
        assert labels(ds.test) == [0, 10] and ds.classnames[10] == dataset_meta("imagenet")["classnames"][wnids[10]]
        img(tmp_path / folder / sub / "n99999999" / "z.jpg")
        with pytest.raises(ValueError, match="unexpected class folder"):
            load(key, tmp_path)


def test_a_classnames_file_lacking_wnids_is_completed_from_the_shipped_names(tmp_path, caplog):
    """A community classnames.txt cut to a few classes: no bare KeyError; the file names what it
    lists, the shipped list the rest, and the warning names the missing wnids. V2's folder numbers
    keep meaning ImageNet's classes whatever the file lists."""
    shipped = dataset_meta("imagenet")["classnames"]
    wnids = sorted(dataset_meta("imagenet_a")["wnids"])
    folder = tmp_path / "imagenet-adversarial"
    img(folder / "imagenet-a" / wnids[3] / "x.jpg")
    (folder / "classnames.txt").write_text(f"{wnids[3]} my class\n{wnids[7]} other one\n")
    with caplog.at_level("WARNING"):
        ds = load("imagenet_a", tmp_path)
    assert ds.classnames[3] == "my class" and ds.classnames[7] == "other one"
    assert ds.classnames[0] == shipped[wnids[0]] and len(ds.classnames) == 200
    assert "names 2 of the 1000 ImageNet classes; the other 998" in caplog.text and WNIDS[0] in caplog.text
    v2 = tmp_path / "imagenetv2"
    img(v2 / "imagenetv2-matched-frequency-format-val/999/b.jpeg")
    (v2 / "classnames.txt").write_text(f"{WNIDS[5]} five\n")  # sorted(file) would make class 0 of it
    ds = load("imagenetv2", tmp_path)
    assert ds.classnames[5] == "five" and ds.classnames[999] == "toilet paper" and labels(ds.test) == [999]


def test_generic_zhou_loader_takes_the_template_of_a_known_split_file(tmp_path):
    rows = {"train": [["a/1.jpg", 0, "banded"]], "val": [], "test": [["a/2.jpg", 0, "banded"]]}
    zhou_split(tmp_path, "split_zhou_DescribableTextures.json", "images", rows)
    assert load("zhou", tmp_path).templates == ["{} texture."]
    (tmp_path / "split_zhou_DescribableTextures.json").rename(tmp_path / "split_zhou_Mine.json")
    assert load("zhou", tmp_path).templates == ["a photo of a {}."]


def test_data_errors_stop_before_any_model_is_loaded(tmp_path, monkeypatch):
    import adapt.run
    from adapt.config import load_recipe

    def no_model(*a, **k):
        raise AssertionError("the backbone was loaded before the data was checked")

    monkeypatch.setattr(adapt.run, "build_backbone", no_model)
    (tmp_path / "oxford_pets").mkdir()
    recipe = load_recipe(None, ["data.dataset=oxford_pets", f"data.root={tmp_path}", f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(FileNotFoundError, match="trainval.txt is missing.*split_zhou_OxfordPets.json"):
        adapt.run.Experiment(recipe)
