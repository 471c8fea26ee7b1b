"""Settings as registered objects: cross-dataset and domain generalization give one accuracy per
target (ImageNet-A / -R over their 200 classes, mapped onto ImageNet's), UPL's pseudo-labels are
class-balanced and the most confident, and each runs end to end from a recipe."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.settings import check_data
from adapt.config import RecipeError, load_recipe
from adapt.data import DataConfig
from adapt.datamodule import AdaptDataModule
from adapt.data.meta import dataset_meta
from adapt.settings import get_setting, list_settings
from adapt.settings.unsupervised import select_confident
from tests.conftest import tiny_overrides, write_image_folder

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_every_setting_is_registered():
    assert list_settings() == ["all", "base2novel", "cross_dataset", "domain_generalization", "multi_task",
                               "unsupervised"]


def datamodule(cfg: DataConfig, backbone) -> AdaptDataModule:
    dm = AdaptDataModule(cfg, backbone.image_size, backbone.image_mean, backbone.image_std, seed=1)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("other"), classes=["cyan", "red", "blue"],
                              per_split={"train": 2, "test": 5}, seed=3)


def test_cross_dataset_one_eval_set_per_target_with_its_own_classes(image_folder, other_folder, tiny_backbone):
    cfg = DataConfig(dataset="imagefolder", root=str(image_folder), shots=2, num_workers=0,
                     setting="cross_dataset", targets=[{"dataset": "imagefolder", "root": str(other_folder)}])
    dm = datamodule(cfg, tiny_backbone)
    assert list(dm.eval_sets) == ["test", "imagefolder"]
    names, items = dm.eval_sets["imagefolder"]
    assert names == ["blue", "cyan", "red"] and len(items) == 15
    assert all(Path(it.path).is_absolute() and Path(it.path).is_file() for it in items)
    x, y = next(iter(dm.test_dataloader()[1]))  # the target's images load through the source's module
    assert x.shape[0] == 15 and sorted(y.tolist()) == sorted(it.label for it in items)
    m = get_setting("cross_dataset").summarize({"test": 90.0, "a": 40.0, "b": 60.0})
    assert m == {"test_acc": 90.0, "a_acc": 40.0, "b_acc": 60.0, "target_mean_acc": 50.0}


def test_cross_dataset_needs_targets():
    with pytest.raises(ValueError, match="needs data.targets"):
        check_data(DataConfig(setting="cross_dataset"))
    with pytest.raises(ValueError, match="dataset name or a mapping"):
        check_data(DataConfig(setting="cross_dataset", targets=[{"root": "x"}]))


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def _folder(root: Path, classes: list[str]) -> Path:
    for split in ("train", "test"):
        for c in classes:
            _png(root / split / c / "0.png")
    return root


def test_domain_generalization_maps_target_classes_onto_the_source(image_folder, tmp_path):
    from adapt.data import build_dataset

    # the target has a subset of the source's classes, in another label order
    shifted = _folder(tmp_path / "shifted", ["yellow", "blue"])
    cfg = DataConfig(dataset="imagefolder", root=str(image_folder), shots=2, setting="domain_generalization",
                     targets=[{"dataset": "imagefolder", "root": str(shifted)}])
    source = build_dataset(cfg)
    plan = get_setting("domain_generalization").plan(cfg, source, seed=1)
    src = source.classnames
    assert plan.extra["target_source_labels"]["imagefolder"] == [src.index("blue"), src.index("yellow")]
    assert plan.eval_sets["imagefolder"][0] == ["blue", "yellow"]
    bad = _folder(tmp_path / "bad", ["magenta", "red"])
    with pytest.raises(ValueError, match="not source classes.*magenta.*cross_dataset"):
        get_setting("domain_generalization").plan(DataConfig(
            dataset="imagefolder", root=str(image_folder), shots=2, setting="domain_generalization",
            targets=[{"dataset": "imagefolder", "root": str(bad)}]), source, seed=1)


def test_imagenet_a_and_r_evaluate_over_their_200_classes_mapped_to_imagenet(tmp_path):
    wnids = sorted(dataset_meta("imagenet")["classnames"])
    names = dataset_meta("imagenet")["classnames"]
    _png(tmp_path / "one.png")
    for split in ("train", "val"):
        for w in wnids:
            (tmp_path / "imagenet/images" / split / w).mkdir(parents=True)
            shutil.copy(tmp_path / "one.png", tmp_path / "imagenet/images" / split / w / "a.JPEG")
    a, r = sorted(dataset_meta("imagenet_a")["wnids"]), sorted(dataset_meta("imagenet_r")["wnids"])
    _png(tmp_path / "imagenet-adversarial/imagenet-a" / a[7] / "x.jpg")
    _png(tmp_path / "imagenet-rendition/imagenet-r" / r[3] / "y.jpg")
    cfg = DataConfig(dataset="imagenet", root=str(tmp_path), shots=1, setting="domain_generalization",
                     targets=["imagenet_a", "imagenet_r"])
    from adapt.data import build_dataset

    plan = get_setting("domain_generalization").plan(cfg, build_dataset(cfg), seed=1)
    assert list(plan.eval_sets) == ["test", "imagenet_a", "imagenet_r"]
    assert len(plan.train_classnames) == 1000
    for key, subset, k in (("imagenet_a", a, 7), ("imagenet_r", r, 3)):
        classnames, items = plan.eval_sets[key]
        assert len(classnames) == 200 and classnames == [names[w] for w in subset]
        assert [it.label for it in items] == [k]
        assert plan.extra["target_source_labels"][key] == [wnids.index(w) for w in subset]


# ---------------------------------------------------------------------------------------- UPL ---
def test_upl_keeps_the_top_n_confident_images_of_each_predicted_class():
    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # 0: class 0, conf .90
        [0.60, 0.30, 0.10],  # 1: class 0, conf .60
        [0.80, 0.10, 0.10],  # 2: class 0, conf .80
        [0.10, 0.70, 0.20],  # 3: class 1, conf .70
        [0.20, 0.75, 0.05],  # 4: class 1, conf .75
        [0.45, 0.10, 0.45],  # 5: tie 0/2 -> argmax picks class 0, conf .45
        [0.30, 0.20, 0.50],  # 6: class 2, conf .50
    ])
    chosen, labels, counts = select_confident(probs, per_class=2)
    assert chosen == [0, 2, 4, 3, 6] and labels == [0, 0, 1, 1, 2]
    assert counts == [2, 2, 1]  # class 2 is predicted once: fewer, recorded
    chosen, labels, counts = select_confident(probs, per_class=1)
    assert chosen == [0, 4, 6] and counts == [1, 1, 1]


def test_upl_setting_hides_labels_until_pseudo_labelled(image_folder, tiny_backbone, tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=str(image_folder), shots=3, num_workers=0, setting="unsupervised")
    dm = AdaptDataModule(cfg, tiny_backbone.image_size, tiny_backbone.image_mean, tiny_backbone.image_std,
                         seed=1, run_dir=tmp_path)
    dm.setup()
    assert {it.label for it in dm.train_items} == {-1} and dm.val_items == []
    pool = list(dm.train_items)
    report = dm.setting.prepare(dm, tiny_backbone, "cpu")["pseudo_labels"]
    # the same zero-shot probabilities, computed here, select the same images
    from adapt.methods.base import zero_shot_text_features

    feats = dm.encode(tiny_backbone, pool, dm.test_transform(), split="train").features[0]
    probs = tiny_backbone.logits(feats, zero_shot_text_features(tiny_backbone, dm.train_classnames,
                                                                dm.templates[:1])).softmax(-1)
    chosen, labels, counts = select_confident(probs, 3)
    assert [(it.path, it.label) for it in dm.train_items] == [(pool[i].path, y) for i, y in zip(chosen, labels)]
    assert all(c <= 3 for c in counts) and report["selected"] == sum(counts) == len(dm.train_items)
    truth = {it.path: it.label for it in dm.dataset.train}
    acc = 100 * np.mean([truth[it.path] == it.label for it in dm.train_items])
    assert report["accuracy"] == pytest.approx(acc)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["labels"].startswith("pseudo") and len(manifest["train"]) == len(dm.train_items)


def test_upl_refuses_a_manifest_and_zero_shots():
    # shots 0 keeps the whole pool unlabelled: a method that trains on labels is refused with it
    from adapt.methods import get_method

    upl = get_setting("unsupervised")
    with pytest.raises(ValueError, match="data.shots >= 1"):
        upl.check_method(DataConfig(setting="unsupervised", shots=0), get_method("coop"))
    upl.check_method(DataConfig(setting="unsupervised", shots=16), get_method("coop"))
    with pytest.raises(ValueError, match="cannot be combined"):
        check_data(DataConfig(setting="unsupervised", manifest="m.json"))


# ------------------------------------------------------------------------------ end to end ---
def test_cross_dataset_and_upl_run_from_recipes(image_folder, other_folder, tmp_path):
    from adapt.run import run_fit

    over = tiny_overrides(image_folder, tmp_path, **{"method.n_ctx": 4, "data.shots": 2, "run_name": "xd"})
    recipe = load_recipe(RECIPES / "cross_dataset/coop_world.yaml", over + [
        f"data.targets=[{{dataset: imagefolder, root: {other_folder}}}]", "baseline=false"])
    m = run_fit(recipe)["metrics"]
    assert set(m) == {"test_acc", "imagefolder_acc", "target_mean_acc"}
    assert m["target_mean_acc"] == m["imagefolder_acc"]
    saved = json.loads((tmp_path / "xd" / "results.json").read_text())
    assert saved["classes"] == {"test": 6, "imagefolder": 3}

    over = tiny_overrides(image_folder, tmp_path, **{"method.n_ctx": 4, "data.shots": 3, "run_name": "upl"})
    res = run_fit(load_recipe(RECIPES / "upl/coop_world.yaml", over + ["baseline=false"]))
    assert set(res["metrics"]) == {"test_acc"} and 0 <= res["pseudo_labels"]["accuracy"] <= 100
    assert res["pseudo_labels"]["per_class"] == 3 and res["pseudo_labels"]["pool"] == 6 * 8


def test_data_recipes_compose_with_method_recipes(tmp_path):
    (tmp_path / "r.yaml").write_text(f"_base_: [{RECIPES}/coop/fewshot.yaml, {RECIPES}/data/imagenet.yaml]\n")
    r = load_recipe(tmp_path / "r.yaml", ["data.root=/somewhere"])
    assert (r.method.name, r.data.dataset, r.trainer.max_epochs, r.data.root) == ("coop", "imagenet", 50, "/somewhere")
    for path in sorted((RECIPES / "data").glob("*.yaml")):
        assert load_recipe(path).data.dataset == path.stem
    with pytest.raises(RecipeError, match="not a known setting"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["data.setting=xd"])
