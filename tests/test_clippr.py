"""CLIPPR and the label-prior inputs: the KL term by hand, the FIFO window's detaching, the online
zero-shot pseudo-labels, the stages, the prior file's checks, and parity with the original's
own code where a checkout is named (ADAPT_CLIPPR_REPO=/path/to/CLIPPR)."""
from __future__ import annotations

import builtins
import importlib
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.data import DataConfig
from adapt.data.priors import load_label_prior
from adapt.methods import build_method
from adapt.methods.base import zero_shot_text_features
from adapt.methods.priors import BatchMeanWindow, batch_mean_probs, prior_kl
from tests.conftest import CLASSES

NAMES = CLASSES[:4]


def _clippr(backbone, name="clippr", **config):
    torch.manual_seed(0)
    return build_method(name, config or None, backbone, NAMES, ["a drawing of a {}."])


# ------------------------------------------------------------------ the prior term --------------
def test_prior_kl_is_the_sum_by_hand_and_zero_shares_add_nothing():
    pi, p = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    by_hand = sum(a * math.log(a / b) for a, b in zip(pi, p))
    assert prior_kl(torch.tensor(pi), torch.tensor(p)).item() == pytest.approx(by_hand, rel=1e-6)
    assert prior_kl(torch.tensor(pi), torch.tensor(pi)).item() == pytest.approx(0.0, abs=1e-7)
    # a class the prior rules out: finite, and equal to the KL over the other classes
    kl = prior_kl(torch.tensor([0.6, 0.4, 0.0]), torch.tensor([0.5, 0.3, 0.2]))
    assert kl.item() == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.3), rel=1e-6)


def test_the_fifo_window_averages_the_last_batches_and_only_the_newest_has_a_gradient():
    window = BatchMeanWindow(3, 4)
    means = [torch.softmax(torch.randn(4), 0).requires_grad_() for _ in range(4)]
    uniform = torch.full((4,), 0.25)
    first = window.push(means[0])
    assert torch.allclose(first, (uniform + uniform + means[0]) / 3)  # started as uniform entries
    window.push(means[1])
    third = window.push(means[2])
    assert torch.allclose(third, (means[0] + means[1] + means[2]) / 3)
    fourth = window.push(means[3])  # the oldest (means[0]) left the window
    assert torch.allclose(fourth, (means[1] + means[2] + means[3]) / 3)
    fourth.sum().backward()
    assert means[0].grad is None and means[1].grad is None and means[2].grad is None
    assert torch.allclose(means[3].grad, torch.full((4,), 1 / 3))


def test_four_accumulated_batches_are_one_batch_of_their_union():
    """The original's group step (mean CE of 4 batches + α KL of the mean of their batch means)
    is the loss of one batch of 4 x the size, value and gradient: what recipes/clippr uses."""
    torch.manual_seed(1)
    logits = torch.randn(32, 5, requires_grad=True)
    targets = torch.randint(0, 5, (32,))
    prior, alpha = torch.full((5,), 0.2), 100.0
    parts = logits.split(8)
    group = (torch.stack([F.cross_entropy(p, t) for p, t in zip(parts, targets.split(8))]).mean()
             + alpha * prior_kl(prior, torch.stack([batch_mean_probs(p) for p in parts]).mean(0)))
    (g_group,) = torch.autograd.grad(group, logits)
    union = F.cross_entropy(logits, targets) + alpha * prior_kl(prior, batch_mean_probs(logits))
    (g_union,) = torch.autograd.grad(union, logits)
    assert union.item() == pytest.approx(group.item(), rel=1e-6)
    assert torch.allclose(g_union, g_group, atol=1e-7)


# ------------------------------------------------------------------ the method -----------------
def test_pseudo_labels_are_the_zero_shot_argmax_and_alpha_zero_is_ce_on_them(tiny_backbone):
    method = _clippr(tiny_backbone, alpha=0.0, templates=["a photo of a {}"]).train()
    feats = torch.randn(16, tiny_backbone.embed_dim)
    out = method.output(feats)
    text = zero_shot_text_features(tiny_backbone, NAMES, ["a photo of a {}"])
    zs = tiny_backbone.logits(F.normalize(feats, dim=-1), text).argmax(-1)
    assert torch.equal(out.tensors["pseudo_labels"], zs)
    assert len(set(zs.tolist())) > 1  # a test that could tell a constant apart
    zeroshot = build_method("zeroshot", {"templates": ["a photo of a {}"]}, tiny_backbone, NAMES, []).eval()
    assert torch.equal(zeroshot.predict(feats).argmax(-1), zs)
    labels = torch.full((16,), -1)  # unlabelled: never read
    assert method.loss(out, labels).item() == pytest.approx(F.cross_entropy(out.logits, zs).item(), rel=1e-6)


def test_the_loss_adds_alpha_times_the_kl_to_the_data_prior_matched_by_name(tiny_backbone):
    method = _clippr(tiny_backbone, alpha=100.0, window=1).train()
    shares = [0.4, 0.3, 0.2, 0.1]  # the data module's classes in another order, other spelling
    data = types.SimpleNamespace(label_prior=shares[::-1], train_classnames=[c.upper() for c in NAMES[::-1]])
    method.setup(data)
    assert method.prior.tolist() == pytest.approx(shares)
    out = method.output(torch.randn(8, tiny_backbone.embed_dim))
    expected = (F.cross_entropy(out.logits, out.tensors["pseudo_labels"])
                + 100.0 * prior_kl(torch.tensor(shares), F.softmax(out.logits, -1).mean(0)))
    assert method.loss(out, torch.full((8,), -1)).item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.scalars) == {"ce", "prior_kl", "agreement"}


def test_the_stages_follow_the_original_schedule(tiny_backbone):
    """clippr_ft's defaults: epochs 0-9 the head at lr, 10-19 the image tower alone at 1e-3 x lr,
    then the head at 0.1 x lr; x0.3 every 10 epochs of a stage, restarting with each stage."""
    method = _clippr(tiny_backbone, "clippr_ft")
    head = [method.lr_factor("head", e) for e in (0, 9, 10, 19, 20, 29, 30, 40)]
    tower = [method.lr_factor("image_tower", e) for e in (0, 9, 10, 19, 20)]
    assert head == pytest.approx([1, 1, 0, 0, 0.1, 0.1, 0.03, 0.009])
    assert tower == [0, 0, 1, 1, 0]
    assert method.param_groups()["image_tower"].lr_scale == pytest.approx(1e-3)
    # in stage 2 the tower has a graph and the head's gradient is dropped; in stage 1 neither
    images = torch.randn(2, 3, 32, 32)
    for epoch, tower_grad in ((0, False), (10, True)):
        method.zero_grad(set_to_none=True)
        method.on_train_epoch_start(epoch, 70)
        method.train()
        method.loss(method.output(images), torch.full((2,), -1)).backward()
        method.transform_gradients(lambda t: t)
        visual = [p.grad for n, p in method.backbone.named_parameters() if n.startswith("model.visual.")]
        assert any(g is not None for g in visual) == tower_grad
        assert all(p.grad is None for p in method.head.parameters()) == tower_grad
    # the teacher is the untouched model: the same pseudo-labels after the tower moved
    before = method.output(images).tensors["pseudo_labels"]
    with torch.no_grad():
        for n, p in method.backbone.named_parameters():
            if n.startswith("model.visual."):
                p.add_(torch.randn_like(p))
    assert torch.equal(method.output(images).tensors["pseudo_labels"], before)


def test_clippr_refuses_stage_two_and_clippr_ft_needs_it(tiny_backbone):
    with pytest.raises(ValueError, match="clippr_ft"):
        _clippr(tiny_backbone, stage2_epochs=5)
    with pytest.raises(ValueError, match="stage2_epochs >= 1"):
        _clippr(tiny_backbone, "clippr_ft", stage2_epochs=0)


@pytest.mark.parametrize("recipe", ["cifar10.yaml", "world.yaml"])
def test_method_name_clippr_ft_on_a_clippr_recipe_gets_the_originals_stage_two(tiny_backbone, recipe):
    """The recipes leave stage2_epochs unset, so ``method.name=clippr_ft`` builds (its 10 epochs)
    instead of failing on a pinned 0, as their comments promise."""
    from adapt.config import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes" / "clippr"
    for name, stage2 in (("clippr", 0), ("clippr_ft", 10)):
        method = dict(load_recipe(root / recipe, [f"method.name={name}"]).method)
        assert method.pop("name") == name
        assert _clippr(tiny_backbone, name, **method).config.stage2_epochs == stage2


# ------------------------------------------------------------------ the prior file -------------
@pytest.mark.parametrize("content,message", [
    ('{"red": 0.5, "green": 0.3, "blue": 0.1, "mauve": 0.1}', "name no class of this data: 'mauve'"),
    ('{"red": 0.5, "green": 0.6, "blue": -0.1, "yellow": 0.0}', "must be >= 0; negative for 'blue'"),
    ('{"red": 0.5, "green": 0.3, "blue": 0.1, "yellow": 0.2}', "sum to 1.1, not 1"),
    ('{"red": 0.5, "green": 0.3, "blue": 0.2}', "1 of the 4 classes have no weight: 'yellow'"),
    ('{"red": 0.5, "green": 0.3,', "not valid JSON"),
    ('{"red": "half", "green": 0.3, "blue": 0.1, "yellow": 0.1}', "not a finite number"),
    ('{"red": 0.5, "Red": 0.0, "green": 0.3, "blue": 0.1, "yellow": 0.1}', "two keys name the class 'red'"),
    ('[0.25, 0.25, 0.25, 0.25]', "holds a list"),
])
def test_each_bad_prior_file_is_one_message(tmp_path, content, message):
    path = tmp_path / "prior.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"data.unlabelled.prior={path}: .*{message}"):
        load_label_prior(str(path), NAMES)


def test_a_good_prior_file_and_uniform(tmp_path):
    path = tmp_path / "prior.json"
    path.write_text('{"Yellow": 0.1, "blue": 0.2, "green": 0.3, "red": 0.4}')  # any order and case
    assert load_label_prior(str(path), NAMES) == [0.4, 0.3, 0.2, 0.1]
    assert load_label_prior("uniform", NAMES) == [0.25] * 4
    assert load_label_prior(None, NAMES) is None


def test_a_bad_prior_stops_the_run_before_the_backbone_loads(image_folder, tmp_path, monkeypatch):
    from adapt.config import load_recipe
    from adapt.run import Experiment
    from tests.conftest import tiny_overrides

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "clippr" / "world.yaml"
    bad = tmp_path / "prior.json"
    bad.write_text(json.dumps({c: 1 / 7 for c in CLASSES}))  # sums to 6/7
    over = tiny_overrides(image_folder, tmp_path, "clippr", **{
        "data.unlabelled.prior": str(bad), "data.setting": "unsupervised", "data.shots": 0})

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was loaded before the prior was checked")

    monkeypatch.setattr("adapt.run.build_backbone", no_backbone)
    with pytest.raises(ValueError, match="the weights sum to 0.857142857, not 1"):
        Experiment(load_recipe(recipe, over))
    # no prior at all: refused by what the method requires
    with pytest.raises(ValueError, match="needs data.unlabelled.prior"):
        Experiment(load_recipe(recipe, over + ["data.unlabelled.prior=null"]))
    # a method that trains on labels, given none
    coop = tiny_overrides(image_folder, tmp_path, "coop", **{"data.setting": "unsupervised", "data.shots": 0})
    with pytest.raises(ValueError, match="method 'coop' trains on labels, .* clippr, clippr_ft"):
        Experiment(load_recipe(recipe.parents[1] / "coop" / "fewshot.yaml", coop))


# ------------------------------------------------------------------ unlabelled images ----------
def test_the_unlabelled_pool_is_the_train_split_or_a_folder_all_labels_hidden(image_folder, tiny_backbone, tmp_path):
    from adapt.datamodule import AdaptDataModule

    def data(**kw):
        cfg = DataConfig(dataset="imagefolder", root=str(image_folder), setting="unsupervised", shots=0,
                         num_workers=0, **kw)
        dm = AdaptDataModule(cfg, tiny_backbone.image_size, tiny_backbone.image_mean, tiny_backbone.image_std,
                             seed=1, run_dir=tmp_path)
        dm.setup()
        return dm

    split = data()
    assert {it.label for it in split.train_items} == {-1}
    assert sorted(it.path for it in split.train_items) == sorted(it.path for it in split.dataset.train)
    assert split.setting.prepare(split, tiny_backbone, "cpu")["unlabelled"]["pool"] == len(split.dataset.train)
    folder = data(unlabelled={"folder": str(image_folder / "val" / "red"), "prior": "uniform"})
    assert len(folder.train_items) == 4 and {it.label for it in folder.train_items} == {-1}
    assert folder.label_prior == [1 / 6] * 6
    with pytest.raises(ValueError, match="not of data.setting=all"):
        DataConfig(setting="all", unlabelled={"folder": str(image_folder)})


# ------------------------------------------------------------------ parity with the original ---
REPO = os.environ.get("ADAPT_CLIPPR_REPO")


@pytest.fixture
def original(monkeypatch):
    """The original's model.py (and dataset.py's prompts), imported from the checkout with its
    dependencies stubbed: ``clip`` (its loader returns an identity image tower), pandas and
    sklearn (imported, unused here), and the DATA_PATH dataset.py reads as a global."""
    if not REPO:
        pytest.skip("set ADAPT_CLIPPR_REPO to a checkout of jonkahana/CLIPPR")

    class Tower(torch.nn.Module):
        def forward(self, x):
            return x

    clip = types.ModuleType("clip")
    clip.load = lambda name, device: (types.SimpleNamespace(visual=Tower()), None)
    sklearn = types.ModuleType("sklearn")
    sklearn.model_selection = types.ModuleType("sklearn.model_selection")
    sklearn.model_selection.train_test_split = None
    for name, module in {"clip": clip, "pandas": types.ModuleType("pandas"), "sklearn": sklearn,
                         "sklearn.model_selection": sklearn.model_selection}.items():
        if name == "pandas" and importlib.util.find_spec("pandas"):
            continue
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(builtins, "DATA_PATH", "/nonexistent", raising=False)
    monkeypatch.syspath_prepend(REPO)
    for name in ("model", "dataset"):
        sys.modules.pop(name, None)
    yield importlib.import_module("model"), importlib.import_module("dataset")
    for name in ("model", "dataset"):
        sys.modules.pop(name, None)


def test_kl_matches_the_originals_kld_loss_in_value_and_gradient(original):
    model, _ = original
    torch.manual_seed(3)
    for _ in range(5):
        prior = torch.softmax(torch.randn(10, dtype=torch.float64), 0)
        logits = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
        mean = F.softmax(logits, -1).mean(0)
        theirs = model.KLD_Loss()(mean, prior)
        ours = prior_kl(prior, batch_mean_probs(logits).double())
        (g_theirs,) = torch.autograd.grad(theirs, logits)
        (g_ours,) = torch.autograd.grad(ours, logits)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-9)
        assert torch.allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_head_matches_the_originals_clip_visual(original, tiny_backbone, batch_norm):
    """The original's CLIP_Visual (identity tower: its input is the image feature) and clippr's
    head, with the same weights, give the same logits; the prompt is the original's."""
    model, dataset = original
    assert dataset.PROMPTS["cifar10"] == "f'a photo of a {c}'"
    from adapt.methods import get_method

    assert get_method("clippr").Config().templates == ["a photo of a {}"]
    d = tiny_backbone.embed_dim
    theirs = model.CLIP_Visual(classes=NAMES, device="cpu", inet=batch_norm)
    theirs.classifier[0] = torch.nn.Linear(d, 128)  # the original hard-codes ViT-B/32's 512
    ours = _clippr(tiny_backbone, batch_norm=batch_norm)  # its input: the backbone's embed_dim
    theirs.classifier.load_state_dict(ours.head.state_dict())
    theirs.eval(), ours.eval()
    feats = torch.randn(6, d)
    with torch.no_grad():
        assert torch.allclose(ours.predict(feats), theirs(feats), atol=1e-6)
    assert [type(m).__name__ for m in ours.head] == [type(m).__name__ for m in theirs.classifier]
    assert theirs.classifier[-1].bias is None and ours.head[-1].bias is None
