"""Multi-label data: the CSV form, PASCAL VOC 2007's layout (a miniature tree), seeded partial
labels stored in the manifest, the settings' refusals, and the world's multi-object scenes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.data import DataConfig, build_dataset, read_manifest, write_manifest
from adapt.data.fewshot import check_manifest
from adapt.data.image_dataset import ImageDataset
from adapt.data.items import Item
from adapt.data.multilabel import VOC_CLASSES, partial_labels
from adapt.settings import get_setting


def _png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


def _csv(root, lines, header="path,labels,split"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    for line in lines:
        _png(root / line.split(",")[0])
    return root


# --------------------------------------------------------------------------- multilabel_csv ---
def test_multilabel_csv_gives_multi_hot_labels_with_unknowns(tmp_path):
    root = _csv(tmp_path / "d", ["a.png,cat;dog,train,", "b.png,dog,train,bird", "c.png,bird,test,",
                                 "e.png,,test,cat"], header="path,labels,split,unknown")
    d = build_dataset(DataConfig(dataset="multilabel_csv", root=str(root)))
    assert d.task == "multi_label" and d.classnames == ["bird", "cat", "dog"]
    assert [it.label for it in d.train] == [(0, 1, 1), (-1, 0, 1)]
    assert [it.label for it in d.test] == [(1, 0, 0), (0, -1, 0)]
    # batches carry [K] tensors, so a loader stacks them to [B, K]
    x, y = ImageDataset(d.train, root)[1]
    assert torch.equal(y, torch.tensor([-1, 0, 1]))


def test_multilabel_csv_names_the_line_of_an_unknown_class(tmp_path):
    root = _csv(tmp_path / "d", ["a.png,cat;dgo,train", "b.png,cat,test"])
    (root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"data.csv, line 2: class 'dgo' is not in .*classes.txt"):
        build_dataset(DataConfig(dataset="multilabel_csv", root=str(root), classnames_file="classes.txt"))
    # without a class list, a name that no training row has is a typo, not a class
    root = _csv(tmp_path / "e", ["a.png,cat,train", "b.png,cta,test"])
    with pytest.raises(ValueError, match=r"line 3: class 'cta' appears in no training row"):
        build_dataset(DataConfig(dataset="multilabel_csv", root=str(root)))


# ----------------------------------------------------------------------------------- voc2007 ---
def _voc_xml(objects):
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult></object>" for n, d in objects)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def test_voc2007_reads_its_layout_and_leaves_difficult_objects_out(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    ann = {"000005": [("chair", 0), ("chair", 1)], "000007": [("car", 0)],
           "000009": [("horse", 0), ("person", 0), ("dog", 1)], "000001": [("dog", 0), ("person", 0)]}
    (root / "Annotations").mkdir(parents=True)
    for i, objects in ann.items():
        (root / "Annotations" / f"{i}.xml").write_text(_voc_xml(objects))
        _png(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n000009\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    d = build_dataset(DataConfig(dataset="voc2007", root=str(root)))
    assert d.classnames == list(VOC_CLASSES) and len(d.classnames) == 20 and d.val == []
    shown = [[VOC_CLASSES[c] for c, v in enumerate(it.label) if v == 1] for it in d.train]
    assert shown == [["chair"], ["car"], ["horse", "person"]]  # the difficult dog is absent (0), not -1
    assert d.train[2].label[VOC_CLASSES.index("dog")] == 0
    assert [it.path for it in d.test] == ["JPEGImages/000001.jpg"]
    (root / "Annotations" / "000007.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"trainval.txt lists 1 image\(s\) without an annotation.*000007.xml"):
        build_dataset(DataConfig(dataset="voc2007", root=str(root)))


# ---------------------------------------------------------------------------- partial labels ---
def _items(n=200, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, k, generator=g) < 0.3).long().tolist()
    return [Item(f"{i}.png", tuple(row)) for i, row in enumerate(labels)]


def test_partial_labels_hide_a_seeded_fraction_and_keep_the_rest():
    items = _items()
    masked = partial_labels(items, 0.5, torch.Generator().manual_seed(3))
    again = partial_labels(items, 0.5, torch.Generator().manual_seed(3))
    other = partial_labels(items, 0.5, torch.Generator().manual_seed(4))
    entries = torch.tensor([it.label for it in masked])
    assert masked == again and masked != other
    assert 0.45 < float((entries == -1).float().mean()) < 0.55  # 1000 Bernoulli(0.5) entries
    truth = torch.tensor([it.label for it in items])
    known = entries != -1
    assert torch.equal(entries[known], truth[known])  # present and absent entries alike are hidden
    assert int(((entries == -1) & (truth == 1)).sum()) > 0 and int(((entries == -1) & (truth == 0)).sum()) > 0


def _multilabel_dataset(tmp_path, n=12):
    lines = [f"{i}.png,{'cat;dog' if i % 3 == 0 else ('dog' if i % 3 == 1 else 'bird')},"
             f"{'train' if i < 8 else 'test'}" for i in range(n)]
    return build_dataset(DataConfig(dataset="multilabel_csv", root=str(_csv(tmp_path / "m", lines))))


def test_the_manifest_stores_the_masked_labels_and_a_rerun_reads_them(tmp_path):
    dataset = _multilabel_dataset(tmp_path)
    cfg = DataConfig(dataset="multilabel_csv", root=str(dataset.root), shots=0, partial_labels=0.5)
    setting = get_setting("all")
    setting.check_dataset(cfg, dataset)
    train, val = setting.sample(cfg, dataset, seed=2)
    assert any(-1 in it.label for it in train) and [it.path for it in train] == [it.path for it in dataset.train]
    path = write_manifest(tmp_path / "manifest.json", dataset.name, dataset.classnames, train, val, 0, 2, "all")
    manifest = read_manifest(path)
    assert manifest.train == train  # lists come back as the same multi-hot tuples
    check_manifest(manifest, dataset, 0)
    rerun = dataclasses.replace(cfg, manifest=str(path))
    assert setting.sample(rerun, dataset, seed=9)[0] == train  # the manifest's mask, not a new draw
    # a known entry that disagrees with the dataset is a different label, refused
    wrong = [Item(it.path, tuple(1 - v if v != -1 else v for v in it.label)) for it in train]
    manifest.train = wrong
    with pytest.raises(ValueError, match="train item.* are not in the dataset's train split"):
        check_manifest(manifest, dataset, 0)


def test_settings_refuse_what_multi_label_data_cannot_do(tmp_path):
    dataset = _multilabel_dataset(tmp_path)
    root = str(dataset.root)
    with pytest.raises(ValueError, match=r"trains on every training image .*; set data.shots=0"):
        get_setting("all").check_dataset(DataConfig(dataset="multilabel_csv", root=root, shots=16), dataset)
    with pytest.raises(ValueError, match=r"data.setting=base2novel splits single_label data, but .* is "
                                         r"multi_label data; use data.setting=all"):
        get_setting("base2novel").check_dataset(DataConfig(dataset="multilabel_csv", root=root, shots=0,
                                                           setting="base2novel"), dataset)
    single = dataclasses.replace(dataset, task="single_label")
    with pytest.raises(ValueError, match=r"data.partial_labels=0.5 hides label entries .*single_label data"):
        get_setting("all").check_dataset(DataConfig(root=root, partial_labels=0.5), single)
    with pytest.raises(ValueError, match=r"data.partial_labels=0 must be in \(0, 1\]"):
        DataConfig(partial_labels=0)


# ------------------------------------------------------------------------------------ world ---
def test_multi_object_rendering_keeps_one_object_pixels_and_maps_each_object():
    from adapt.data.world.render import render, render_objects
    from adapt.data.world.scenes import sample_scene

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, 32)
    one = render(scene, "dusk", np.random.default_rng(5))
    image, objects = render_objects([scene], "dusk", np.random.default_rng(5))
    assert np.array_equal(one, image)
    a = dataclasses.replace(scene, x=0, y=0, side=14, angle=0, shape="square", fill="solid")
    b = dataclasses.replace(a, x=8, y=8, colour="blue" if a.colour != "blue" else "red")
    _, objects = render_objects([a, b], "clean", np.random.default_rng(1))
    assert objects[2, 2] == 0 and objects[12, 12] == 1 and objects[30, 30] == -1  # b occludes a


def test_world_multi_colour_labels_are_the_colours_drawn():
    from adapt.data.world.multi import MULTI_TASKS
    from adapt.data.world import vocab

    task = MULTI_TASKS["world_multi_colour"]
    counts = []
    for i, (image, labels, objects, scenes) in enumerate(task.generate("train", 0)):
        assert labels == sorted(vocab.COLOUR_NAMES.index(s.colour) for s in scenes)
        assert len(set(labels)) == len(scenes) and 1 <= len(scenes) <= 3
        assert set(np.unique(objects)) <= set(range(-1, len(scenes)))
        counts.append(len(scenes))
        if i == 60:
            break
    assert set(counts) == {1, 2, 3}
    d = build_dataset(DataConfig(dataset="world_multi_colour", shots=0))
    assert d.task == "multi_label" and d.classnames == list(vocab.COLOUR_NAMES)  # the vocabulary's order
    assert (len(d.train), len(d.val), len(d.test)) == task.images
    first = next(task.generate("train", 0))
    assert [c for c, v in enumerate(d.train[0].label) if v == 1] == first[1]


def test_coco2014_reads_instances_json_as_the_originals(tmp_path):
    import json

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split, anns in (("train2014", [(7, 3), (5, 1), (7, 1), (7, 1)]), ("val2014", [(9, 90)])):
        images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in (5, 7, 8, 9)]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "categories": cats,
            "annotations": [{"image_id": i, "category_id": c, "area": 10.0} for i, c in anns]}))
    d = build_dataset(DataConfig(dataset="coco2014", root=str(root)))
    assert d.task == "multi_label" and d.classnames == ["person", "car", "toothbrush"]  # category-id order
    # only annotated images, in first-annotation order (image 8 has none)
    assert [(it.path, it.label) for it in d.train] == [("train2014/COCO_train2014_000000000007.jpg", (1, 1, 0)),
                                                       ("train2014/COCO_train2014_000000000005.jpg", (1, 0, 0))]
    assert [it.label for it in d.test] == [(0, 0, 1)]


def test_nus_wide_reads_the_official_81_concept_lists(tmp_path):
    root = tmp_path / "nus"
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("airport\nanimal\n")
    lists = {"Train": ["actor\\0001_1.jpg", "zebra\\0002_2.jpg"], "Test": ["sky\\0003_3.jpg"]}
    labels = {("airport", "Train"): "1\n0\n", ("animal", "Train"): "1\n1\n",
              ("airport", "Test"): "0\n", ("animal", "Test"): "1\n"}
    for name, paths in lists.items():
        (root / "ImageList" / f"{name}Imagelist.txt").write_text("\n".join(paths) + "\n")
    for (c, name), text in labels.items():
        (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{name}.txt").write_text(text)
    d = build_dataset(DataConfig(dataset="nus_wide", root=str(root)))
    assert d.classnames == ["airport", "animal"]
    assert [(it.path, it.label) for it in d.train] == [("Flickr/actor/0001_1.jpg", (1, 1)),
                                                       ("Flickr/zebra/0002_2.jpg", (0, 1))]
    assert [it.label for it in d.test] == [(0, 1)]
    (root / "Groundtruth" / "TrainTestLabels" / "Labels_animal_Test.txt").write_text("1\n1\n")
    with pytest.raises(ValueError, match=r"Labels_animal_Test.txt: expected one 0 or 1 per image"):
        build_dataset(DataConfig(dataset="nus_wide", root=str(root)))
