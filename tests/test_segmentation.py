"""The segmentation task (label maps, mIoU as mmsegmentation computes it), its data in the
community's layouts and the user's CSV form, the world's label maps, and MaskCLIP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adapt.config import load_recipe
from adapt.data import DataConfig
from adapt.data.registry import build_dataset
from adapt.methods import build_method
from adapt.run import run_fit
from adapt.tasks import get_task
from adapt.tasks.segmentation import JointTransform, SegmentationEvaluator, confusion, segmentation_scores
from tests.conftest import CLASSES, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# ------------------------------------------------------------------------------ metrics ---------
def test_scores_of_a_confusion_matrix_by_hand():
    hist = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 occurs nowhere: left out
    s = segmentation_scores(hist)
    assert s["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert s["aacc"] == pytest.approx(5 / 6)
    assert s["macc"] == pytest.approx((3 / 4 + 1) / 2)


def test_miou_accumulates_over_the_split_not_per_image():
    """Two images, one class each: per-image IoUs would average 1 and 0.5; the split's
    intersection over union is what mmseg reports."""
    ev = SegmentationEvaluator(2)
    t1 = torch.zeros(1, 2, 2, dtype=torch.long)  # all class 0, predicted right
    t2 = torch.tensor([[[1, 1], [1, 1]]])  # all class 1, half predicted 0
    l1 = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    l2 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    ev.update(l1, t1)
    ev.update(l2, t2)
    s = ev.compute()
    # class 0: inter 4, union 4 + 6 - 4 = 6; class 1: inter 2, union 4 + 2 - 2 = 4
    assert s["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert s["aacc"] == pytest.approx(6 / 8)


def test_logits_are_upsampled_to_the_label_map_and_ignore_counts_nowhere():
    logits = torch.randn(2, 3, 2, 2)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :, :3] = 255
    ev = SegmentationEvaluator(3)
    ev.update(logits, target)
    pred = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False).argmax(1)
    keep = target != 255
    hand = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(target[keep].tolist(), pred[keep].tolist()):
        hand[t, p] += 1
    assert torch.equal(ev.hist, hand) and int(ev.hist.sum()) == 2 * 8 * 5
    task = get_task("segmentation")
    loss = task.loss(logits, target)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up.permute(0, 2, 3, 1)[keep], target[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_class_id_outside_the_list_is_named():
    with pytest.raises(ValueError, match="class id 7, outside the 3 classes"):
        confusion(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7), 3)


# ------------------------------------------------------------------------------ transforms ------
def test_training_crop_moves_the_label_map_with_the_pixels():
    """An image whose colour is its label: after the random crop and flip, every labelled pixel
    still sits on its colour (nearest-neighbour for the map, so no label is blended)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (8, 8)).repeat(12, 0).repeat(12, 1).astype(np.int64)  # 12 px blocks
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    image = Image.fromarray(colours[labels])
    palette = torch.from_numpy(colours).float()
    for scale, least in (((1.0, 1.0), 1.0), ((0.3, 0.6), 0.8)):
        t = JointTransform(24, mean=(0, 0, 0), std=(1, 1, 1), scale=scale)
        for seed in range(5):
            torch.manual_seed(seed)
            x, m = t(image, torch.from_numpy(labels))
            assert x.shape == (3, 24, 24) and m.shape == (24, 24) and m.dtype == torch.int64
            nearest = torch.cdist((x.permute(1, 2, 0) * 255).reshape(-1, 3), palette).argmin(1).reshape(24, 24)
            agree = float((nearest == m).float().mean())
            # whole frame: every pixel; small crops: bicubic blurs the image's block edges only
            assert agree >= least
            assert float((nearest == m.flip(-1)).float().mean()) < agree - 0.2  # a map left unflipped


# ------------------------------------------------------------------------------ data ------------
def _write_csv_tree(root: Path, mask_size=(16, 16), bad_id: int | None = None) -> Path:
    (root / "img").mkdir(parents=True)
    (root / "ann").mkdir()
    rows = ["path,mask,split"]
    for i, split in enumerate(["train", "train", "test"]):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "img" / f"{i}.png")
        m = np.full(mask_size[::-1], 255, np.uint8)
        m[:4] = i % 2
        if bad_id is not None and i == 2:
            m[0, 0] = bad_id
        Image.fromarray(m, mode="L").save(root / "ann" / f"{i}.png")
        rows.append(f"img/{i}.png,ann/{i}.png,{split}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "classnames.txt").write_text("sky\nroad_sign\n")
    return root


def test_segmentation_csv_reads_label_maps(tmp_path):
    d = build_dataset(DataConfig(dataset="segmentation_csv", root=str(_write_csv_tree(tmp_path))))
    assert d.task == "segmentation" and d.classnames == ["sky", "road sign"]
    assert [it.label for it in d.train] == ["ann/0.png", "ann/1.png"] and len(d.test) == 1


@pytest.mark.parametrize("problem,match", [
    ({"mask_size": (16, 12)}, r"ann/0.png: the label map is 16x12 but its image .* is 16x16"),
    ({"bad_id": 9}, r"ann/2.png: class id 9 is outside the 2 classes"),
])
def test_bad_label_maps_are_named_before_training(tmp_path, problem, match):
    with pytest.raises(ValueError, match=match):
        build_dataset(DataConfig(dataset="segmentation_csv", root=str(_write_csv_tree(tmp_path, **problem))))


def test_voc2012_layout(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, ids in (("train", ["2007_000032"]), ("val", ["2007_000033", "2007_000042"])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
            m = Image.fromarray(np.array([[0] * 12] * 9 + [[255] * 12], np.uint8), mode="P")
            m.putpalette([0, 0, 0, 128, 0, 0] + [0] * (253 * 3) + [224, 224, 192])
            m.save(root / "SegmentationClass" / f"{i}.png")
    d = build_dataset(DataConfig(dataset="voc2012_seg", root=str(root)))
    assert len(d.classnames) == 21 and d.classnames[0] == "background" and d.classnames[15] == "person"
    assert [it.path for it in d.test] == ["JPEGImages/2007_000033.jpg", "JPEGImages/2007_000042.jpg"]
    task = get_task("segmentation")
    image = Image.open(root / d.test[0].path).convert("RGB")
    _, target = task.read(image, d.test[0].label, root, lambda im: im)
    assert target.shape == (10, 12) and set(target.unique().tolist()) == {0, 255}  # palette indices


def _map(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(rows, np.uint8), mode="L").save(path)


def _jpg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def test_reduce_zero_label_ignores_zero_and_moves_every_id_down_one(tmp_path):
    from adapt.tasks.segmentation import reduce_zero

    assert reduce_zero(np.array([[0, 1, 2], [150, 255, 7]])).tolist() == [[255, 0, 1], [149, 255, 6]]
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(f"{split}0\n")
        _jpg(root / "JPEGImages" / f"{split}0.jpg", 2, 3)
        _map(root / "SegmentationClass" / f"{split}0.png", [[0, 15, 20], [255, 1, 0]])
    d = build_dataset(DataConfig(dataset="voc2012_seg", root=str(root), reduce_zero_label=True))
    assert len(d.classnames) == 20 and d.classnames[0] == "aeroplane" and d.classnames[14] == "person"
    from adapt.datamodule import AdaptDataModule

    dm = AdaptDataModule(DataConfig(dataset="voc2012_seg", root=str(root), reduce_zero_label=True, shots=0),
                         32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), seed=1)
    dm.setup()
    loader = dm.dataloader(dm.dataset.test, dm.test_transform(), 1)
    _, target = next(iter(loader))
    assert target[0].tolist() == [[255, 14, 19], [255, 0, 255]]  # person (15) is class 14 of VOC-20


@pytest.mark.parametrize("name,classes,reduced", [("ade20k", 150, True), ("pascal_context59", 59, True),
                                                  ("coco_stuff164k", 171, False)])
def test_mmseg_layouts_read_their_trees(tmp_path, name, classes, reduced):
    root = tmp_path / name
    if name == "ade20k":
        pairs = {s: (f"images/{s}/ADE_{s}_0001.jpg", f"annotations/{s}/ADE_{s}_0001.png")
                 for s in ("training", "validation")}
    elif name == "coco_stuff164k":
        pairs = {s: (f"images/{s}/000000000139.jpg", f"annotations/{s}/000000000139_labelTrainIds.png")
                 for s in ("train2017", "val2017")}
    else:
        pairs = {}
        for s in ("train", "val"):
            (root / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
            (root / "ImageSets" / "SegmentationContext" / f"{s}.txt").write_text(f"2008_00{s}\n")
            pairs[s] = (f"JPEGImages/2008_00{s}.jpg", f"SegmentationClassContext/2008_00{s}.png")
    for image, mask in pairs.values():
        _jpg(root / image, 2, 2)
        _map(root / mask, [[0, 1], [classes - 1 + reduced, 255]])
    d = build_dataset(DataConfig(dataset=name, root=str(root)))
    assert len(d.classnames) == classes and d.task == "segmentation"
    assert [it.label for it in d.test] == [list(pairs.values())[1][1]]
    assert d.read_options == ({"reduce_zero_label": True} if reduced else {})
    _, target = get_task("segmentation").read(Image.open(root / d.test[0].path), d.test[0].label, root,
                                              lambda im: im, **d.read_options)
    want = [[255, 0], [classes - 1, 255]] if reduced else [[0, 1], [classes - 1, 255]]
    assert target.tolist() == want
    assert {"ade20k": "wall", "pascal_context59": "aeroplane", "coco_stuff164k": "person"}[name] == d.classnames[0]
    # an id past the class list is named before training
    _map(root / list(pairs.values())[0][1], [[0, classes + reduced], [0, 0]])
    with pytest.raises(ValueError, match=f"class id {classes + reduced} is outside the {classes} classes"):
        build_dataset(DataConfig(dataset=name, root=str(root)))


def test_world_label_maps_match_the_multi_label_scenes():
    """world_seg_colour's label maps hold exactly the colours its scenes show, ids of the class
    list, background 255."""
    d = build_dataset(DataConfig(dataset="world_seg_colour", root=None))
    assert d.task == "segmentation" and len(d.classnames) == 12
    assert len(d.train) == 1200 and len(d.test) == 600
    from adapt.data.world.multi import MULTI_TASKS

    world = MULTI_TASKS["world_seg_colour"]
    for item, (image, _, objects, scenes) in zip(d.train[:20], world.generate("train", seed=0)):
        m = np.asarray(Image.open(d.root / item.label))
        shown = sorted(set(np.unique(m).tolist()) - {255})
        visible = sorted({world.classnames.index(scenes[i].attribute("colour"))
                          for i in np.unique(objects[objects >= 0]).tolist()})
        assert shown == visible and (m == 255).sum() == (objects < 0).sum()
        assert np.array_equal(np.asarray(Image.open(d.root / item.path)), image)


def test_different_sizes_in_one_batch_name_the_fix():
    task = get_task("segmentation")
    batch = [(torch.zeros(3, 4, 4), torch.zeros(4, 4)), (torch.zeros(3, 4, 6), torch.zeros(4, 6))]
    with pytest.raises(ValueError, match="set data.eval_batch_size=1"):
        task.collate(batch)


# ------------------------------------------------------------------------------ MaskCLIP --------
def test_maskclip_logits_are_the_value_path_cosines(tiny_backbone):
    method = build_method("maskclip", None, tiny_backbone, CLASSES[:3], ["a photo of a {}."],
                          task="segmentation").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = tiny_backbone.encode_image_dense(images, outputs=("value",), normalize=False)
        f = F.normalize(dense.as_map("value"), dim=1)
        t = method.text_features
        hand = (f[:, None] * t[None, :, :, None, None]).sum(2)
        logits = method.predict(images)
    assert logits.shape == (2, 3, *dense.grid) and torch.allclose(logits, hand, atol=1e-6)
    assert logits.abs().max() <= 1 + 1e-6  # cosines: no logit scale
    from adapt.methods.maskclip import maskclip_templates, prompt_denoise

    templates = maskclip_templates()
    assert len(templates) == 85 and templates[0] == "a bad photo of a {}."
    assert templates[-1] == "this is one {} in the scene."
    assert method.hand_written_templates() == templates  # the original's prompt engineering
    # prompt denoising: a class never confident anywhere is set to -100 everywhere
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = 0.05  # class 0 wins every pixel: softmax(100 x) = e^5 / (e^5 + 1) ~ 0.993
    out = prompt_denoise(x, 0.5)
    assert torch.equal(out[0, 0], x[0, 0]) and bool((out[0, 1] == -100).all())


def test_maskclip_refuses_single_label_data(tiny_backbone):
    with pytest.raises(ValueError, match="method 'maskclip' does segmentation"):
        build_method("maskclip", None, tiny_backbone, CLASSES[:3], ["a {}"], task="single_label")


def test_maskclip_segments_the_world_above_chance(tmp_path):
    """Training-free, on the shipped tiny CLIP: the value path segments the world's colours well
    above chance, and better than the plain last-block tokens (MaskCLIP's finding)."""
    over = ["trainer.progress_bar=false", "logger.csv=false", "data.num_workers=0", f"output_dir={tmp_path}"]
    value = run_fit(load_recipe(RECIPES / "maskclip" / "world.yaml", over + ["run_name=v"]))
    tokens = run_fit(load_recipe(RECIPES / "maskclip" / "world.yaml", over + ["run_name=t", "method.features=tokens"]))
    saved = json.loads((tmp_path / "v" / "results.json").read_text())
    # chance: a uniform guess over 12 classes has IoU ~ 1/23 per class (about 4.3) and aAcc 8.3
    assert value["metrics"]["test_miou"] > 8.0 and saved["task_metrics"]["test"]["aacc"] > 15.0
    assert value["metrics"]["test_miou"] > tokens["metrics"]["test_miou"] + 3.0
    assert not math.isnan(saved["task_metrics"]["test"]["macc"])
    # training-free, so its settings are the adapter: written, exported, and loaded as it ran
    from adapt.export import export_run
    from adapt.inference import load_adapter

    metas = [json.loads((Path(r["adapter_dir"]) / "adapter.json").read_text()) for r in (value, tokens)]
    assert [m["method_config"]["features"] for m in metas] == ["value", "tokens"]
    assert all(m["method"] == "maskclip" and m["task"] == "segmentation" and len(m["classnames"]) == 12
               for m in metas)
    exported = export_run(tmp_path / "t", tmp_path / "exported")
    model = load_adapter(exported, device="cpu")
    assert model.config.features == "tokens" and model.classnames == metas[1]["classnames"]


def test_contract_data_runs_maskclip_through_the_runner(image_folder, segmentation_folder, tmp_path):
    """On the fixture's label maps (each image one colour, a border ignored) the run reports
    the task's metrics, and the ignored border counts nowhere."""
    over = tiny_overrides(image_folder, tmp_path, "maskclip", **{
        "data.dataset": "segmentation_csv", "data.root": str(segmentation_folder), "data.shots": 0,
        "run_name": "r", "method.template_set": "dataset", "data.image_size": "null",
        "data.reduce_zero_label": "null"})
    res = run_fit(load_recipe(RECIPES / "maskclip" / "voc2012.yaml", over + ["data.eval_batch_size=4"]))
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["task"] == "segmentation" and 0 <= res["metrics"]["test_miou"] <= 100
    assert set(saved["task_metrics"]["test"]) == {"miou", "aacc", "macc"}


# ------------------------------------------------------------------------------ predict ---------
def test_predict_writes_each_images_label_map_at_its_own_size(tmp_path, capsys):
    """``adapt predict`` on a segmentation adapter: one PNG per image at the image's size, the
    argmax of the method's upsampled logits; the CSV's shares are the map's pixel shares; a
    second run reuses its own folder, a foreign folder is refused."""
    import adapt
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.cli import main
    from adapt.data.world.vocab import COLOURS
    from adapt.export import save_adapter
    from adapt.tasks.segmentation import read_label_map, upsample

    bb = build_backbone(BackboneConfig(name="tiny-vit-p4", pretrained="world"))
    names = list(COLOURS)[:5]
    method = build_method("maskclip", None, bb, names, ["a photo of a {} object."], task="segmentation")
    adapter = save_adapter(method, tmp_path / "adapter")  # training-free: the config is the adapter
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for name, (w, h) in {"wide": (48, 32), "tall": (32, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(adapter), str(images), "--top-k", "2", "--out", str(out), "--device", "cpu"]) == 0
    rows = list(__import__("csv").DictReader(open(out)))
    assert [Path(r["path"]).name for r in rows] == ["tall.png", "wide.png"]
    assert list(rows[0]) == ["path", "label_1", "share_1", "label_2", "share_2", "label_map"]
    model = adapt.load_adapter(adapter, device="cpu")
    for r in rows:
        with Image.open(r["path"]) as im:
            size = (im.height, im.width)
            x = model.preprocess(im.convert("RGB"))[None]
        label_map = read_label_map(Path(r["label_map"]))
        assert label_map.shape == size and Path(r["label_map"]).parent == tmp_path / "pred_label_maps"
        with torch.no_grad():
            hand = upsample(model.predict(x), size).argmax(1)[0].numpy()
        assert np.array_equal(label_map, hand)
        share = np.bincount(label_map.flatten(), minlength=5) / label_map.size
        assert r["label_1"] == names[int(share.argmax())] and float(r["share_1"]) == pytest.approx(share.max(), abs=1e-6)
    assert main(["predict", str(adapter), str(images), "--out", str(out), "--device", "cpu"]) == 0  # its own folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["predict", str(adapter), str(images), "--out", str(out), "--maps-dir", str(foreign),
                 "--device", "cpu"]) != 0
    assert "mine exists and is not a folder of label maps written by adapt predict" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_predict_slides_the_window_the_run_evaluated_with(tmp_path):
    """An adapter whose run evaluated with ``data.slide_window`` records it, and ``adapt predict``
    slides it (not one whole-image pass); ``--slide-window CROP STRIDE`` overrides it, and is
    refused for an adapter whose task has no window."""
    import adapt
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.cli import main
    from adapt.data.world.vocab import COLOURS
    from adapt.export import save_adapter
    from adapt.tasks.segmentation import read_label_map, slide_inference, upsample

    bb = build_backbone(BackboneConfig(name="tiny-vit-p4", pretrained="world"))
    names = list(COLOURS)[:5]
    method = build_method("maskclip", None, bb, names, ["a photo of a {} object."],
                          task=get_task("segmentation", slide_window=[16, 8]))
    adapter = save_adapter(method, tmp_path / "adapter")
    assert json.loads((adapter / "adapter.json").read_text())["task_options"] == {"slide_window": [16, 8]}
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    model = adapt.load_adapter(adapter, device="cpu")
    assert model.task.slide_window == (16, 8)
    with Image.open(images / "a.png") as im:
        x = model.preprocess(im.convert("RGB"))[None]
    with torch.no_grad():
        by = {w: upsample(slide_inference(model.predict, x, *w), (40, 56)).argmax(1)[0].numpy()
              for w in ((16, 8), (24, 12))}
        whole = upsample(model.predict(x), (40, 56)).argmax(1)[0].numpy()
    assert not np.array_equal(by[(16, 8)], whole) and not np.array_equal(by[(16, 8)], by[(24, 12)])
    for extra, window in (([], (16, 8)), (["--slide-window", "24", "12"], (24, 12))):
        out = tmp_path / f"pred{window[0]}.csv"
        assert main(["predict", str(adapter), str(images), "--out", str(out), "--device", "cpu"] + extra) == 0
        row = next(__import__("csv").DictReader(open(out)))
        assert np.array_equal(read_label_map(Path(row["label_map"])), by[window])
    with pytest.raises(ValueError, match=r"slide_window=\[8, 16\] must be \[crop, stride\]"):
        adapt.load_adapter(adapter, device="cpu", task_options={"slide_window": [8, 16]})
    meta = json.loads((adapter / "adapter.json").read_text())
    (adapter / "adapter.json").write_text(json.dumps({**meta, "task_options": {"window": [16, 8]}}))
    with pytest.raises(ValueError, match=r"\"task_options\" is not an object of segmentation options \(slide_window\)"):
        adapt.load_adapter(adapter, device="cpu")
    single = save_adapter(build_method("zeroshot", None, bb, names, ["a {}"]), tmp_path / "single")
    with pytest.raises(ValueError, match="slide_window configures segmentation adapters; this one is single_label"):
        adapt.load_adapter(single, device="cpu", task_options={"slide_window": [16, 8]})


def test_task_predictions_read_logits_as_the_task_does():
    """single-label: a softmax over the classes; multi-label: each class's own sigmoid, and the
    classes above 0.5 listed as present."""
    names = ["a", "b", "c"]
    logits = torch.tensor([[2.0, 0.0, -1.0], [-3.0, 1.0, 0.5]])
    rows, maps = get_task("single_label").predictions(logits, names, 2, [(1, 1)] * 2)
    p = logits.softmax(-1)
    assert maps is None and rows[1]["label_1"] == "b" and rows[1]["prob_1"] == pytest.approx(float(p[1, 1]), abs=1e-6)
    rows, _ = get_task("multi_label").predictions(logits, names, 3, [(1, 1)] * 2)
    s = logits.sigmoid()
    assert rows[0]["prob_1"] == pytest.approx(float(s[0, 0]), abs=1e-6) and rows[0]["present"] == "a"
    assert rows[1]["present"] == "b;c" and rows[1]["prob_3"] == pytest.approx(float(s[1, 0]), abs=1e-6)


def test_slide_inference_stitches_windows_like_mmseg():
    from adapt.tasks.segmentation import slide_inference

    x = torch.randn(2, 3, 10, 13)
    calls = []

    def pixelwise(crop):  # a per-pixel "model": windows must stitch back to the whole image
        calls.append(tuple(crop.shape[-2:]))
        return crop[:, :2] * 3.0

    out = slide_inference(pixelwise, x, crop=6, stride=4)
    assert torch.allclose(out, x[:, :2] * 3.0, atol=1e-6)
    # rows: ceil((10 - 6) / 4) + 1 = 2, columns: ceil((13 - 6) / 4) + 1 = 3; every window 6 x 6
    assert calls == [(6, 6)] * 6
    # coarse logits are upsampled per window, then averaged where windows overlap
    coarse = slide_inference(lambda c: c[:, :1, ::2, ::2], x, crop=6, stride=4)
    by_hand = torch.zeros(2, 1, 10, 13)
    count = torch.zeros(10, 13)
    for y1 in (0, 4):
        for x1 in (0, 4, 7):
            by_hand[:, :, y1:y1 + 6, x1:x1 + 6] += F.interpolate(x[:, :1, y1:y1 + 6:2, x1:x1 + 6:2], size=(6, 6),
                                                                 mode="bilinear", align_corners=False)
            count[y1:y1 + 6, x1:x1 + 6] += 1
    assert torch.allclose(coarse, by_hand / count, atol=1e-6)
    small = slide_inference(lambda c: c[:, :2], torch.randn(1, 3, 4, 5), crop=6, stride=4)
    assert small.shape == (1, 2, 4, 5)  # an image smaller than the crop: one window of its size


def test_slide_window_reaches_evaluation_and_is_refused_on_classification(image_folder, segmentation_folder,
                                                                         tmp_path):
    from adapt.config import RecipeError

    over = tiny_overrides(image_folder, tmp_path, "maskclip", **{
        "data.dataset": "segmentation_csv", "data.root": str(segmentation_folder), "data.shots": 0,
        "method.template_set": "dataset", "data.image_size": "null", "data.reduce_zero_label": "null"})
    whole = run_fit(load_recipe(RECIPES / "maskclip" / "voc2012.yaml", over + ["run_name=w"]))
    slid = run_fit(load_recipe(RECIPES / "maskclip" / "voc2012.yaml", over + ["run_name=s", "data.slide_window=[16,8]"]))
    # 16-pixel windows of 32-pixel images see other context than the whole image: other figures
    assert slid["metrics"]["test_miou"] != whole["metrics"]["test_miou"]
    one = run_fit(load_recipe(RECIPES / "maskclip" / "voc2012.yaml", over + ["run_name=o", "data.slide_window=[32,16]"]))
    assert one["metrics"]["test_miou"] == pytest.approx(whole["metrics"]["test_miou"], abs=1e-9)  # one window
    with pytest.raises(RecipeError, match=r"data.slide_window configures segmentation data, and this "
                                          r"dataset's labels are single_label; remove data.slide_window"):
        run_fit(load_recipe(RECIPES / "coop" / "fewshot.yaml",
                            tiny_overrides(image_folder, tmp_path, "coop") + ["data.slide_window=[16,8]"]))
    with pytest.raises(Exception, match=r"must be \[crop, stride\]"):
        load_recipe(RECIPES / "maskclip" / "voc2012.yaml", over + ["data.slide_window=[8,16]"])
