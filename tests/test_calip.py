"""CALIP: zero-shot at β = 0, the original's per-image computation, its β grid searched on
validation only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from adapt.methods.calip import search_grid
from tests.conftest import CLASSES

NAMES = CLASSES[:4]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _images(n=5):
    torch.manual_seed(3)
    return torch.randn(n, 3, 32, 32)


def test_zero_betas_give_the_zero_shot_logits(tiny_backbone):
    calip = build_method("calip", {"beta2": 0.0, "beta3": 0.0, "logit_scale": None}, tiny_backbone, NAMES, TEMPLATES)
    zs = build_method("zeroshot", {"ensemble": True}, tiny_backbone, NAMES, TEMPLATES)
    with torch.no_grad():
        assert (calip(_images()) - zs(_images())).abs().max() <= 1e-5


def test_logits_follow_the_originals_per_image_computation(tiny_backbone):
    """run_imagenet.py's get_logits, one image at a time with its layouts (features [d, HW],
    classifier [d, K]), against the batched method."""
    calip = build_method("calip", {"beta2": 0.7, "beta3": 0.03}, tiny_backbone, NAMES, TEMPLATES)
    images = _images()
    with torch.no_grad():
        dense = tiny_backbone.encode_image_dense(images, outputs=("pooled", "tokens"))
        feat_t = calip.text_features.t()  # [d, K]
        rows = []
        for i in range(len(images)):
            feat_v = dense.tokens[i].t()  # [d, HW]
            a = feat_v.t() @ feat_t * 2
            feat_t_a = feat_v @ F.softmax(a, dim=0)
            feat_v_a = F.softmax(a, dim=1) @ feat_t.t()
            feat_v_a = feat_v_a.mean(0) + feat_v_a.max(0)[0]
            l1 = 100.0 * dense.pooled[i] @ feat_t_a
            l2 = 100.0 * feat_v_a @ feat_t
            rows.append(100.0 * dense.pooled[i] @ feat_t + 0.7 * l1 + 0.03 * l2)
        ref = torch.stack(rows)
        got = calip(images)
    assert (got - ref).abs().max() <= 1e-4
    # both attention terms matter: not the zero-shot logits
    assert (got - 100.0 * dense.pooled @ feat_t).abs().max() > 1e-3


def test_search_is_the_originals_grid_with_the_first_best_kept(tiny_backbone):
    calip = build_method("calip", {"steps": 9}, tiny_backbone, NAMES, TEMPLATES)
    torch.manual_seed(0)
    zs, t1, t2 = torch.randn(40, 4), 3 * torch.randn(40, 4), 30 * torch.randn(40, 4)
    labels = torch.randint(0, 4, (40,))
    result = calip.search(zs, t1, t2, labels)
    best, choice = 0.0, None
    for b2 in search_grid(2.0, 9):  # the original's loop: strict improvement over best_acc = 0
        for b3 in search_grid(0.1, 9):
            acc = float(((zs + b2 * t1 + b3 * t2).argmax(-1) == labels).float().mean())
            if acc > best:
                best, choice = acc, (b2, b3)
    assert (result["beta2"], result["beta3"]) == pytest.approx(choice)
    assert float(calip.beta2) == pytest.approx(choice[0]) and result["val_acc"] == pytest.approx(100 * best)
    assert search_grid(2.0, 200)[:2] == pytest.approx([0.001, 0.001 + 1.999 / 200])


def test_setup_searches_on_the_validation_split_only(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    calip = build_method("calip", None, tiny_backbone, dm.train_classnames, TEMPLATES)
    calip.setup(dm)
    assert calip.search_result["val_images"] == len(dm.val_items)
    assert set(calip.scalars()) == {"beta2", "beta3", "val_acc", "val_acc_before"}
    fixed = build_method("calip", {"search": False, "beta2": 0.3}, tiny_backbone, dm.train_classnames, TEMPLATES)
    fixed.setup(dm)
    assert fixed.search_result is None and float(fixed.beta2) == pytest.approx(0.3)


def test_runner_gives_calip_and_its_zero_shot_baseline_their_own_inputs(image_folder, tmp_path):
    """The baseline beside a dense-feature method is evaluated on pooled features (the data
    module is re-pointed for it and back), and equals a zero-shot run on its own."""
    from pathlib import Path

    from adapt.config import load_recipe
    from adapt.run import run_fit
    from tests.conftest import tiny_overrides

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    over = tiny_overrides(image_folder, tmp_path, "calip", **{"baseline": "true", "run_name": "c",
                                                               "data.cache_dir": str(tmp_path / "cache")})
    res = run_fit(load_recipe(recipes / "calip/fewshot.yaml", over))
    assert res["inputs"] == "features"
    plain = tmp_path / "zeroshot.yaml"
    plain.write_text("method: {name: zeroshot}\ntrainer: {max_epochs: 0}\n")
    zs = run_fit(load_recipe(plain, tiny_overrides(image_folder, tmp_path, "zeroshot", **{
        "run_name": "z", "data.cache_dir": str(tmp_path / "cache")})))
    assert res["zeroshot_metrics"] == pytest.approx(zs["metrics"])
