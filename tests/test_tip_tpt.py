"""Tip-Adapter(-F) and TPT: their defining behaviours."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from adapt.config import load_recipe
from adapt.data import DataConfig
from adapt.datamodule import AdaptDataModule
from adapt.data.feature_cache import DEFAULT_VIEW_SEED, view_seed
from adapt.data.image_dataset import load_image
from adapt.data.transforms import train_transform
from adapt.export import AdapterError, load_adapter, save_adapter
from adapt.methods import build_method
from adapt.methods.tip_adapter import search_grid
from adapt.methods.tpt import averaged_entropy, crop_boxes, resized_crops
from adapt.run import Experiment, run_fit
from tests.conftest import CLASSES, tiny_overrides, write_image_folder

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _tip(backbone, dm, **cfg):
    method = build_method("tipadapter", cfg, backbone, dm.train_classnames, TEMPLATES)
    method.setup(dm)
    return method.eval()


def _features(backbone, dm, items, normalize=True):
    loader = dm.dataloader(items, dm.test_transform(), 64)
    with torch.no_grad():
        pairs = [(backbone.encode_image(x, normalize=normalize), y) for x, y in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


# ------------------------------------------------------------------------------ Tip-Adapter ----
def test_alpha_zero_is_exactly_the_zero_shot_model(tiny_backbone, tiny_datamodule):
    zs = build_method("zeroshot", {"ensemble": True}, tiny_backbone, tiny_datamodule.train_classnames,
                      TEMPLATES).eval()
    images = torch.randn(5, 3, 32, 32)
    own = {"clip_logit_scale": None, "search": False, "augment_epochs": 1}
    tip0 = _tip(tiny_backbone, tiny_datamodule, alpha=0.0, **own)
    tip1 = _tip(tiny_backbone, tiny_datamodule, alpha=1.0, **own)
    with torch.no_grad():
        ref = zs(images)
        assert (tip0.predict(images) - ref).abs().max() <= 1e-5
        assert (tip1.predict(images) - ref).abs().max() > 1e-3  # the cache does contribute


def test_zero_shot_logits_are_scaled_by_100_as_the_original_not_by_the_model_scale(tiny_backbone, tiny_datamodule):
    """Tip-Adapter's main.py multiplies the CLIP logits by a hard-coded 100; the tiny random
    backbone's exp(logit_scale) is 1/0.07 ≈ 14.3, so the two defaults differ by a factor 7."""
    zs = build_method("zeroshot", {"ensemble": True}, tiny_backbone, tiny_datamodule.train_classnames,
                      TEMPLATES).eval()
    scale = float(tiny_backbone.logit_scale)
    assert abs(scale - 100.0) > 50  # the two choices really differ on this backbone
    images = torch.randn(5, 3, 32, 32)
    tip = _tip(tiny_backbone, tiny_datamodule, alpha=0.0, search=False, augment_epochs=1)
    assert tip.config.clip_logit_scale == 100.0
    with torch.no_grad():
        feats = F.normalize(tiny_backbone.encode_image(images), dim=-1)
        expected = 100.0 * feats @ tip.text_features.t()
        assert (tip.predict(images) - expected).abs().max() <= 1e-4
        assert (tip.predict(images) - zs(images) * (100.0 / scale)).abs().max() <= 1e-4
        with_cache = _tip(tiny_backbone, tiny_datamodule, alpha=1.0, search=False, augment_epochs=1)
        cache = with_cache.predict(images) - expected  # α · exp(−β(1 − f·Kᵀ)) · V, unscaled
        manual = torch.exp(-1.0 * (1 - feats @ with_cache.cache_keys.t())) @ with_cache.cache_values
        assert (cache - manual).abs().max() <= 1e-4


def test_without_augmentation_keys_are_the_training_features(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    tip = _tip(tiny_backbone, dm, augment_epochs=0, search=False)
    feats, labels = _features(tiny_backbone, dm, dm.train_items)
    assert tip.cache_keys.shape == (len(dm.train_items), tiny_backbone.embed_dim)
    assert torch.allclose(tip.cache_keys, feats, atol=1e-6)
    assert torch.equal(tip.cache_labels, labels)
    assert torch.equal(tip.cache_values, F.one_hot(labels, len(CLASSES)).float())


def test_keys_are_the_renormalized_mean_of_augmented_passes(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    tip = _tip(tiny_backbone, dm, augment_epochs=3, search=False)
    # by hand: three passes of crop scale (0.5, 1) + flip, view v of an image seeded by
    # (view seed, v, path) as the feature cache draws them; the unnormalized features are
    # averaged, then normalized (as the original code does)
    transform = train_transform(dm.image_size, dm.mean, dm.std, (0.5, 1.0))
    passes = []
    for v in range(3):
        images = []
        for item in dm.train_items:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(DEFAULT_VIEW_SEED, v, item.path))
                images.append(transform(load_image(dm.dataset.root / item.path)))
        with torch.no_grad():
            passes.append(tiny_backbone.encode_image(torch.stack(images), normalize=False))
    expected = F.normalize(torch.stack(passes).mean(0), dim=-1)
    assert torch.allclose(tip.cache_keys, expected, atol=1e-5)
    plain, _ = _features(tiny_backbone, dm, dm.train_items)
    assert (tip.cache_keys - plain).abs().max() > 1e-3  # the passes were augmented
    again = _tip(tiny_backbone, dm, augment_epochs=3, search=False)
    assert torch.equal(again.cache_keys, tip.cache_keys)  # fixed by the seed
    dm.use_feature_cache = False  # recipe cache=false: encoded afresh, the same keys
    try:
        fresh = _tip(tiny_backbone, dm, augment_epochs=3, search=False)
    finally:
        dm.use_feature_cache = True
    assert torch.allclose(fresh.cache_keys, tip.cache_keys, atol=1e-6)


def _reference_search(tip, feats, labels):
    """The original's loop, literally: β outer, α inner, strict improvement."""
    zs = 100.0 * feats @ tip.text_features.t()  # main.py: 100. * features @ clip_weights
    affinity = feats @ tip.cache_keys.t()
    best, choice = -1, None
    for beta in search_grid(tip.config.beta_max, tip.config.beta_steps):
        cache = torch.exp(-beta * (1 - affinity)) @ tip.cache_values
        for alpha in search_grid(tip.config.alpha_max, tip.config.alpha_steps):
            correct = int(((zs + alpha * cache).argmax(-1) == labels).sum())
            if correct > best:
                best, choice = correct, (alpha, beta)
    return choice


def test_alpha_beta_are_searched_on_validation_only(tiny_backbone, tiny_datamodule, tmp_path, monkeypatch):
    # no validation split: the config's values stay
    root = write_image_folder(tmp_path / "noval", per_split={"train": 4, "test": 2})
    noval = AdaptDataModule(DataConfig(dataset="imagefolder", root=str(root), shots=4, num_workers=0),
                            32, tiny_backbone.image_mean, tiny_backbone.image_std, seed=1)
    noval.setup()
    assert not noval.val_items
    tip = _tip(tiny_backbone, noval, augment_epochs=1, alpha=1.0, beta=1.0)
    assert (float(tip.alpha), float(tip.beta)) == (1.0, 1.0) and tip.search_result is None

    # with validation images: the images read are training and validation images, never test ones
    dm = tiny_datamodule
    seen: list[str] = []
    original = dm.encode
    monkeypatch.setattr(dm, "encode", lambda backbone, items, *a, **k: (seen.extend(i.path for i in items),
                                                                         original(backbone, items, *a, **k))[1])
    tip = _tip(tiny_backbone, dm, augment_epochs=1)
    monkeypatch.undo()
    test_paths = {i.path for _, items in dm.eval_sets.values() for i in items}
    assert seen and not set(seen) & test_paths
    assert set(seen) == {i.path for i in dm.train_items} | {i.path for i in dm.val_items}
    chosen = (float(tip.alpha), float(tip.beta))
    assert chosen != (1.0, 1.0) and tip.search_result["val_images"] == len(dm.val_items)
    feats, labels = _features(tiny_backbone, dm, dm.val_items)
    alpha, beta = _reference_search(tip, feats, labels)
    assert chosen == pytest.approx((alpha, beta), abs=1e-6)
    again = _tip(tiny_backbone, dm, augment_epochs=1)
    assert (float(again.alpha), float(again.beta)) == chosen


def test_tip_adapter_f_trains_only_its_keys(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    tip = _tip(tiny_backbone, dm, finetune=True, augment_epochs=1, search=False).train()
    assert [n for n, p in tip.named_parameters() if p.requires_grad] == ["cache_keys"]
    frozen = {k: v.clone() for k, v in tip.state_dict().items() if k != "cache_keys"}
    keys0 = tip.cache_keys.detach().clone()
    feats, labels = _features(tiny_backbone, dm, dm.train_items)
    opt = torch.optim.AdamW(tip.trainable_parameters(), lr=1e-3, eps=1e-4)
    losses = []
    for _ in range(50):
        loss = tip.loss(tip.forward_features(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, (losses[0], losses[-1])
    assert not torch.equal(tip.cache_keys, keys0)
    for k, v in tip.state_dict().items():
        if k != "cache_keys":
            assert torch.equal(v, frozen[k]), k


def test_tip_adapter_f_fit_end_to_end_searches_after_training(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, method="tipadapter", **{
        "method.augment_epochs": 2, "data.batch_size": 8, "trainer.max_epochs": 3, "run_name": "f"})
    exp = Experiment(load_recipe(RECIPES / "tipadapter/fewshot_f.yaml", over))
    assert exp.recipe.optim.name == "adamw" and exp.method.config.finetune
    exp.method.setup(exp.data)
    keys0 = exp.method.cache_keys.detach().clone()
    exp.fit()
    assert exp.method.cache_keys.shape == keys0.shape
    assert not torch.allclose(exp.method.cache_keys.detach().cpu(), keys0.cpu())
    assert exp.method.search_result is not None  # α/β chosen on val after training
    accs = exp.evaluate()
    assert 0.0 <= accs["test"] <= 100.0


def test_tip_adapter_export_reproduces_and_refuses_other_classes(tiny_backbone, tiny_datamodule, tmp_path):
    tip = _tip(tiny_backbone, tiny_datamodule, finetune=True, augment_epochs=1)
    with torch.no_grad():
        tip.cache_keys.add_(0.01 * torch.randn_like(tip.cache_keys))
    save_adapter(tip, tmp_path)
    loaded = load_adapter(tmp_path, backbone=tiny_backbone).eval()
    images = torch.randn(4, 3, 32, 32)
    assert (float(loaded.alpha), float(loaded.beta)) == (float(tip.alpha), float(tip.beta))
    assert torch.allclose(loaded.predict(images), tip.predict(images), atol=1e-6)
    with pytest.raises(AdapterError, match="cannot classify other class"):
        load_adapter(tmp_path, backbone=tiny_backbone, classnames=["a", "b", "c", "d", "e", "f"])
    with pytest.raises(ValueError, match="cannot classify other class names"):
        tip.set_classnames(list(reversed(tip.classnames)))
    unbuilt = build_method("tipadapter", None, tiny_backbone, CLASSES, TEMPLATES)
    with pytest.raises(RuntimeError, match="no cache yet"):
        unbuilt.predict(images)


# ------------------------------------------------------------------------------------- TPT -----
def _tpt(backbone, **cfg):
    cfg.setdefault("seed", 1)
    return build_method("tpt", cfg, backbone, CLASSES, TEMPLATES).eval()


def test_tpt_with_lr_zero_predicts_like_the_initial_prompt(tiny_backbone):
    images = torch.randn(3, 3, 32, 32)
    coop = build_method("coop", {"ctx_init": "a photo of a"}, tiny_backbone, CLASSES, TEMPLATES).eval()
    with torch.no_grad():
        ref = coop(images)
    assert (_tpt(tiny_backbone, lr=0.0).predict(images) - ref).abs().max() <= 1e-5
    assert (_tpt(tiny_backbone, lr=0.05).predict(images) - ref).abs().max() > 1e-4


def test_tpt_step_lowers_the_entropy_of_the_selected_views(tiny_backbone):
    tpt = _tpt(tiny_backbone)
    torch.manual_seed(3)
    image = torch.randn(3, 32, 32)
    with torch.no_grad():
        feats = tiny_backbone.encode_image(tpt.views(image))
        before = tiny_backbone.logits(feats, tpt.prompts.text_features())
        chosen = tpt.select(before)
    assert len(chosen) == 6  # 10% of 64 views
    ctx = tpt.tune(feats)
    with torch.no_grad():
        after = tiny_backbone.logits(feats, tpt.prompts.text_features(ctx))
    assert averaged_entropy(after[chosen]) < averaged_entropy(before[chosen]) - 1e-4
    assert not torch.equal(ctx, tpt.prompts.ctx)  # tuned a copy, the initial context is unchanged


def test_tpt_resets_the_prompt_for_every_image(tiny_backbone):
    tpt = _tpt(tiny_backbone)
    torch.manual_seed(4)
    a, b = torch.randn(2, 3, 32, 32)
    init = tpt.prompts.ctx.clone()
    both = tpt.predict(torch.stack([a, b]))
    assert torch.allclose(both[1:], tpt.predict(b[None]), atol=1e-6)
    assert torch.allclose(both[:1], tpt.predict(a[None]), atol=1e-6)
    assert not torch.allclose(both[0], both[1])
    assert torch.equal(tpt.prompts.ctx, init)


def test_tpt_views_are_seeded_crops_with_the_original_first(tiny_backbone, tiny_datamodule):
    tpt = build_method("tpt", None, tiny_backbone, CLASSES, TEMPLATES)
    tpt.setup(tiny_datamodule)
    assert tpt.config.seed == tiny_datamodule.seed == 1  # the recipe seed, recorded for export
    torch.manual_seed(5)
    image, other = torch.randn(2, 3, 32, 32)
    views = tpt.views(image)
    assert views.shape == (64, 3, 32, 32) and torch.equal(views[0], image)
    assert torch.equal(tpt.views(image), views)  # deterministic for (seed, image)
    assert not torch.equal(_tpt(tiny_backbone, seed=2).views(image), views)
    # crops equal torchvision's crop-then-resize (bilinear) and flip, for the boxes drawn
    gen = torch.Generator().manual_seed(0)
    boxes = crop_boxes(40, 56, 100, gen)
    big = torch.randn(3, 40, 56)
    crops = resized_crops(big, boxes)
    flipped = 0
    for crop, (top, left, h, w, flip) in zip(crops, boxes.long().tolist()):
        ref = TF.resized_crop(big, top, left, h, w, [40, 56], interpolation=TF.InterpolationMode.BILINEAR,
                              antialias=False)
        ref = TF.hflip(ref) if flip else ref
        flipped += flip
        assert (crop - ref).abs().max() < 1e-4
    area = boxes[:, 2] * boxes[:, 3] / (40 * 56)
    assert 0.08 - 1e-2 <= area.min() and area.max() <= 1.0 and 20 < flipped < 80


def test_tpt_adapts_inside_the_lightning_test_loop(tmp_path, monkeypatch):
    from adapt.methods.tpt import TPT

    moved = []
    original = TPT.tune

    def spy(self, feats, ctx0=None):
        ctx = original(self, feats, ctx0)
        moved.append(float((ctx - self.prompts.ctx).abs().max()))
        return ctx

    monkeypatch.setattr(TPT, "tune", spy)
    root = write_image_folder(tmp_path / "images", per_split={"train": 1, "test": 2})
    over = tiny_overrides(root, tmp_path, method="tpt", **{"method.n_views": 8, "run_name": "tpt",
                                                           "data.shots": 1})
    results = run_fit(load_recipe(RECIPES / "tpt/fewshot.yaml", over))
    n_test = len(list((root / "test").rglob("*.png")))
    assert len(moved) == n_test and min(moved) > 0  # every test image took a gradient step
    assert 0.0 <= results["metrics"]["test_acc"] <= 100.0
    assert results["timing"]["fit_seconds"] == 0.0 and results["trainable_params"] == 0
    assert "adapter_dir" not in results  # nothing trained, nothing to export
    saved = load_recipe(tmp_path / "tpt" / "recipe.yaml")
    assert saved.method.name == "tpt" and saved.method.n_views == 8
