"""SuS-X: support sets (data.support: folder, world renderer, retrieval) and TIP-X (``susx``).

The original's own functions are compared in tests/test_susx_original.py (ADAPT_SUSX_REPO)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adapt.config import RecipeError, load_recipe
from adapt.data import DataConfig
from adapt.data.items import Item
from adapt.data.support import SupportConfig
from adapt.data.support_sources import check_support
from adapt.data.world.tasks import TASKS
from adapt.datamodule import AdaptDataModule
from adapt.methods import build_method
from adapt.run import run_fit
from tests.conftest import CLASSES, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
COLOURS = TASKS["world_colour"].classnames
TEMPLATES = ["a photo of a {}."]


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def susx(tiny_backbone):
    """A TIP-X over 30 random support features of the six classes, ψ fitted on 40 images."""
    method = build_method("susx", {"clip_logit_scale": None, "templates": TEMPLATES}, tiny_backbone, CLASSES,
                          TEMPLATES).eval()
    d = tiny_backbone.embed_dim
    method._set_cache(_unit(30, d, 0), torch.arange(30) % len(CLASSES))
    method.fit_psi(_unit(40, d, 1))
    return method


# ------------------------------------------------------------------ TIP-X values ---------------
def test_alpha_and_gamma_zero_is_zero_shot(susx, tiny_backbone):
    zeroshot = build_method("zeroshot", {"templates": TEMPLATES}, tiny_backbone, CLASSES, TEMPLATES).eval()
    f = _unit(7, tiny_backbone.embed_dim, 2)
    susx.alpha.fill_(0.0), susx.gamma.fill_(0.0), susx.beta.fill_(5.0)
    with torch.no_grad():
        assert torch.allclose(susx.forward_features(f), zeroshot.forward_features(f), atol=1e-5)
        susx.gamma.fill_(0.7)  # and the KL term does move them
        assert (susx.forward_features(f) - zeroshot.forward_features(f)).abs().max() > 1e-2


def test_gamma_zero_is_tip_adapter_without_training(susx, tiny_backbone):
    tip = build_method("tipadapter", {"clip_logit_scale": None, "ensemble": False}, tiny_backbone,
                       CLASSES, TEMPLATES).eval()
    tip._set_cache(susx.cache_keys, susx.cache_labels)
    for m in (tip, susx):
        m.alpha.fill_(2.5), m.beta.fill_(5.5)
    susx.gamma.fill_(0.0)
    f = _unit(7, tiny_backbone.embed_dim, 3)
    with torch.no_grad():
        assert torch.allclose(susx.forward_features(f), tip.forward_features(f), atol=1e-4)


def test_every_kl_row_is_the_definition_and_psi_maps_val_onto_its_affinities(susx, tiny_backbone):
    """150 images: the original leaves rows 100-149 at 0 (departure 1); here each row is KL(P‖Q)."""
    f = _unit(150, tiny_backbone.embed_dim, 4)
    w = susx.text_features.float()
    p = torch.softmax(f @ w.t() / 0.5, -1)
    log_q = torch.log_softmax(susx.cache_keys @ w.t() / 0.5, -1)
    direct = (p[:, None] * (p.log()[:, None] - log_q[None])).sum(-1)
    assert (susx.kl_divergence(f) - direct).abs().max() <= 1e-5 and (direct[100:] > 0).all()
    susx.fit_psi(f)  # on its fitting set, ψ spans exactly the affinity range
    psi, affinity = susx.psi(susx.kl_divergence(f)), f @ susx.cache_keys.t()
    assert torch.allclose(psi.min(), affinity.min(), atol=1e-6) and torch.allclose(psi.max(), affinity.max(), atol=1e-6)
    # one fixed map: an image's logits do not depend on the batch it comes in
    with torch.no_grad():
        assert torch.allclose(susx.forward_features(f)[:3], susx.forward_features(f[:3]), atol=1e-5)


def test_the_search_finds_a_better_triple_on_val_and_keeps_the_first_best(susx, tiny_backbone):
    d = tiny_backbone.embed_dim
    y = torch.arange(60) % len(CLASSES)
    centres = F.normalize(susx.cache_keys[:len(CLASSES)], dim=-1)  # support j has label j % 6
    f = F.normalize(centres[y] + 0.6 * _unit(60, d, 5), dim=-1)
    susx._val = (f, y)
    susx.fit_psi(f)
    found = susx.search_hparams()
    assert found["val_acc"] >= found["val_acc_before"] and found["val_acc"] > 50
    alphas, betas, gammas = susx.grids()
    assert len(alphas) * len(betas) * len(gammas) == 200_000 and betas[0] == 1.0 and alphas[1] == 0.1 + 49.9 / 20
    # no earlier triple (loop order α, β, γ) scores as well as the chosen one
    with torch.no_grad():
        chosen = (found["alpha"], found["beta"], found["gamma"])
        best = int((susx.forward_features(f).argmax(-1) == y).sum())
        for a in alphas[:alphas.index(chosen[0])]:
            for b in betas[::50]:
                for g in gammas[::25]:
                    susx.alpha.fill_(a), susx.beta.fill_(b), susx.gamma.fill_(g)
                    assert int((susx.forward_features(f).argmax(-1) == y).sum()) < best


# ------------------------------------------------------------------ support sets ---------------
def _folder(root: Path, classes, n=5) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_support_matches_classes_by_name_and_draws_per_class_seeded(tmp_path):
    names = ["Red", "dark_green", "blue"]
    folder = _folder(tmp_path / "sus", names, n=5)
    wanted = ["blue", "dark green", "red"]  # other order and spelling than the folders
    got = check_support(SupportConfig(source="folder", folder=str(folder), per_class=3), "x", wanted, None)
    assert got.classnames == wanted and len(got.items) == 9
    assert all(Path(it.path).parent.name.lower().replace("_", " ") == wanted[it.label] for it in got.items)
    again = check_support(SupportConfig(source="folder", folder=str(folder), per_class=3), "x", wanted, None)
    other = check_support(SupportConfig(source="folder", folder=str(folder), per_class=3, seed=4), "x", wanted, None)
    assert got.items == again.items and got.items != other.items
    assert got.report == {"support_images": 9, "support_min_per_class": 3}


@pytest.mark.parametrize("case,match", [
    ("names", r"do not match the dataset's 3 classes \(not classes: 'purple'; classes without a folder: 'blue'\)"),
    ("missing", r"no such folder; give a folder with one subfolder of images per class"),
    ("no_source", r"data.support.folder=.* is given but data.support.source is null: set data.support.source=folder"),
    ("empty", r"class folder\(s\) 'red' hold no images"),
    ("world_elsewhere", r"data.support.source=world draws on the offline world.*data.dataset=imagefolder is not one"),
    ("shift", r"data.support.shift='fog' is not a world domain"),
    ("descriptions", r"prompt=descriptions queries the pool .* set data.class_text.descriptions"),
    ("pool", r"data.support.pool=5 cannot give 100 images per class"),
])
def test_bad_support_inputs_are_one_message(case, match, tmp_path):
    folder = _folder(tmp_path / "sus", ["red", "green", "purple"])
    names = ["red", "green", "blue"]
    dataset, config = "imagefolder", {"source": "folder", "folder": str(folder)}
    if case == "missing":
        config["folder"] = str(tmp_path / "nowhere")
    elif case == "no_source":
        config["source"] = None
    elif case == "empty":
        names = ["red", "green", "purple"]
        for p in (folder / "red").iterdir():
            p.unlink()
    elif case == "world_elsewhere":
        config = {"source": "world"}
    elif case != "names":
        dataset, names = "world_colour", COLOURS
        config = {"shift": {"source": "world", "shift": "fog"}, "descriptions": {"source": "retrieval",
                  "prompt": "descriptions"}, "pool": {"source": "retrieval", "pool": 5}}[case]
    with pytest.raises(ValueError, match=match) as err:
        check_support(SupportConfig(**config), dataset, names, None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data.support.source='sd' is not one of folder, world, retrieval, train"):
        SupportConfig(source="sd")


def _pixels(support, i):
    return np.asarray(Image.open(support.root / support.items[i].path))


def test_world_support_renders_every_class_seeded_and_the_shift_changes_the_images():
    cfg = SupportConfig(source="world", per_class=3)
    got = check_support(cfg, "world_colour", COLOURS, None)
    assert got.classnames == COLOURS and len(got.items) == 36
    assert sorted(it.label for it in got.items) == sorted(list(range(12)) * 3)
    assert got.report["support_domain"] == "clean"
    again = check_support(cfg, "world_colour", COLOURS, None)
    reseeded = check_support(dataclasses.replace(cfg, seed=1), "world_colour", COLOURS, None)
    shifted = check_support(dataclasses.replace(cfg, shift="sketch"), "world_colour", COLOURS, None)
    assert (_pixels(got, 0) == _pixels(again, 0)).all() and got.root == again.root
    assert not (_pixels(got, 0) == _pixels(reseeded, 0)).all()
    assert shifted.report["support_domain"] == "sketch" and shifted.root != got.root
    assert np.mean([np.abs(_pixels(got, i).astype(int) - _pixels(shifted, i)).mean() for i in range(12)]) > 10
    none = check_support(dataclasses.replace(cfg, shift="none"), "world_colour", COLOURS, None)
    assert none.report["support_domain"] == TASKS["world_colour"].domain  # the target's own camera


@pytest.fixture(scope="module")
def world_backbone():
    from adapt.backbone import BackboneConfig, build_backbone

    return build_backbone(BackboneConfig(name="tiny-vit-p4", pretrained="world"))


def _world_dm(backbone, **support):
    dm = AdaptDataModule(DataConfig(dataset="world_colour", shots=2, num_workers=0, support=support),
                         backbone.image_size, backbone.image_mean, backbone.image_std, seed=1)
    dm.setup()
    return dm


def test_retrieval_keeps_the_top_images_of_every_class_seeded(world_backbone):
    dm = _world_dm(world_backbone, source="retrieval", per_class=5, pool=600)
    got = dm.support_set(world_backbone)
    assert got.classnames == COLOURS and len(got.items) == 60
    assert sorted(it.label for it in got.items) == sorted(list(range(12)) * 5)
    assert got.items == dm.support_set(world_backbone).items  # the same pool, the same ranking
    # class 0's images are the pool's most similar to its photo prompt
    rows = json.loads((got.root / "pool.json").read_text())["rows"]
    pool = [Item(r[0], 0) for r in rows]
    feats = F.normalize(dm.encode(world_backbone, pool, dm.test_transform(), "pool", normalize=False,
                                  root=got.root).features[0].float(), dim=-1)
    with torch.no_grad():
        text = world_backbone.encode_text(world_backbone.tokenize([dm.templates[0].format(COLOURS[0])])).float()
    sims = (feats @ F.normalize(text, dim=-1).t())[:, 0]
    kept = {it.path for it in got.items if it.label == 0}
    inside = torch.tensor([r[0] in kept for r in rows])
    assert int(inside.sum()) == 5 and sims[inside].min() >= sims[~inside].max()
    # the world CLIP reads colours: most retrieved images are of the right colour
    assert got.report["support_label_precision"] > 50
    other = _world_dm(world_backbone, source="retrieval", per_class=5, pool=600, seed=3).support_set(world_backbone)
    assert other.root != got.root and other.items != got.items


def test_susx_runs_from_the_world_recipe_on_a_rendered_support_set(tmp_path):
    over = ["data.support.per_class=10", "data.shots=4", f"output_dir={tmp_path}", "run_name=r",
            "trainer.progress_bar=false", "logger.csv=false", "baseline=false"]
    results = run_fit(load_recipe(ROOT / "recipes" / "susx" / "world.yaml", over))
    assert results["scalars"]["support_images"] == 120 and 0 < results["metrics"]["test_acc"] <= 100
    assert {"alpha", "beta", "gamma", "val_acc"} <= set(results["scalars"])


def test_a_recipe_without_a_support_set_is_refused_before_the_model_loads(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, "susx", **{"backbone.name": "no-such-model"})
    with pytest.raises(RecipeError, match="method 'susx' needs data.support.source: a support set"):
        run_fit(load_recipe(ROOT / "recipes" / "susx" / "world.yaml", over + ["data.support.source=null",
                                                                              "data.class_text.descriptions=null",
                                                                              "data.class_text.templates=false"]))


def test_few_shot_support_is_the_training_images(image_folder, tiny_datamodule, tiny_backbone):
    method = build_method("susx", {"augment_epochs": 0}, tiny_backbone, CLASSES, TEMPLATES)
    method.setup(tiny_datamodule)
    assert len(method.cache_keys) == len(tiny_datamodule.train_items) == 4 * len(CLASSES)
    assert method.support_report["support_images"] == 24 and method.search_result is not None

