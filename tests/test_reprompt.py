"""RePrompt and its retrieval index: the behaviours that define them."""
from __future__ import annotations

import math

import pytest
import torch

from adapt.methods import build_method
from adapt.methods.reprompt import blend
from adapt.methods.retrieval import FeatureIndex, training_items

TEMPLATES = ["a photo of a {}."]


def _reprompt(backbone, dm, setup=True, **cfg):
    torch.manual_seed(0)
    method = build_method("reprompt", {"n_tokens": 2, "depth": 2, **cfg}, backbone, dm.train_classnames,
                          TEMPLATES)
    if setup:
        method.setup(dm)
    return method.eval()


def _unit(*angles_deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


# ------------------------------------------------------------------------------ the index ------
def test_index_returns_the_true_k_nearest_and_leave_one_out_drops_the_nearest():
    index = FeatureIndex(2)
    index.set(_unit(0, 10, 45, 90, 180), torch.tensor([0, 0, 1, 1, 2]))
    query = _unit(40)
    sims, idx = index.search(query, k=3)
    assert idx.tolist() == [[2, 1, 0]]  # 5°, 30°, 40° away (then 50°, 140°)
    assert torch.allclose(sims, torch.cos(torch.deg2rad(torch.tensor([[5.0, 30.0, 40.0]]))))
    sims, idx = index.search(query, k=3, exclude_nearest=True)
    assert idx.tolist() == [[1, 0, 3]]
    # a query that is itself an entry finds itself first, and never under leave-one-out
    assert index.search(_unit(90), k=1)[1].tolist() == [[3]]
    assert 3 not in index.search(_unit(90), k=4, exclude_nearest=True)[1].tolist()[0]
    # k is capped at what the index holds (minus the excluded entry)
    assert index.search(query, k=99)[1].shape == (1, 5)
    assert index.search(query, k=99, exclude_nearest=True)[1].shape == (1, 4)
    with pytest.raises(RuntimeError, match="index is empty"):
        FeatureIndex(2).search(query, k=1)


def test_vote_and_blend_on_a_hand_computed_case():
    index = FeatureIndex(2)
    index.set(_unit(0, 10, 45, 90), torch.tensor([0, 0, 1, 2]))
    sims, idx = index.search(_unit(0), k=3)  # entries 0, 1, 2: cos 0°, 10°, 45°
    tau = 0.1
    w = index.neighbour_weights(sims, tau)
    e = [math.exp(math.cos(math.radians(a)) / tau) for a in (0, 10, 45)]
    expect_w = [x / sum(e) for x in e]
    assert torch.allclose(w, torch.tensor([expect_w]), atol=1e-6)
    vote = index.vote(w, idx, 3)
    assert torch.allclose(vote, torch.tensor([[expect_w[0] + expect_w[1], expect_w[2], 0.0]]), atol=1e-6)
    # the neighbours' weighted mean feature (the input stage reads it; no labels)
    assert torch.allclose(index.mix(w, idx), (torch.tensor(expect_w)[:, None] * _unit(0, 10, 45)).sum(0)[None],
                          atol=1e-6)
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    sm = torch.softmax(logits, -1)
    lam = 0.25
    expect = torch.log(0.75 * sm + lam * vote)
    assert torch.allclose(blend(logits, vote, lam), expect, atol=1e-6)
    assert torch.allclose(torch.softmax(blend(logits, vote, lam), -1), 0.75 * sm + lam * vote, atol=1e-6)


# ------------------------------------------------------------------------------ the method -----
def test_at_knn_weight_zero_without_the_retrieval_prompt_it_is_exactly_vpt(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    vpt = build_method("vpt", {"n_tokens": 2, "depth": 2}, tiny_backbone, dm.train_classnames, TEMPLATES).eval()
    with torch.no_grad():
        for p in vpt.vision.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = vpt.predict(images)
        off = _reprompt(tiny_backbone, dm, knn_weight=0.0, prompt_from_retrieval=False)
        off.vision.load_state_dict(vpt.vision.state_dict())
        assert len(off.index) == 0  # nothing to retrieve: no index is built
        assert torch.equal(off.predict(images), ref)
        # the retrieval prompt starts at zero: training starts from VPT
        neutral = _reprompt(tiny_backbone, dm, knn_weight=0.0)
        neutral.vision.load_state_dict(vpt.vision.state_dict())
        assert (neutral.predict(images) - ref).abs().max() <= 1e-6
        neutral.retrieval_proj.weight.add_(0.5 * torch.randn_like(neutral.retrieval_proj.weight))
        assert (neutral.predict(images) - ref).abs().max() > 1e-4


def test_logits_are_the_log_of_the_blend_of_the_prompted_model_and_the_knn_vote(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    method = _reprompt(tiny_backbone, dm, k=5, temperature=0.05, knn_weight=0.4)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        images = torch.randn(3, 3, 32, 32)
        q = tiny_backbone.encode_image(images)
        sims = q @ method.index.keys.t()
        top, idx = sims.topk(5, dim=-1)
        w = torch.softmax(top / 0.05, -1)
        vote = torch.zeros(3, len(dm.train_classnames)).scatter_add_(1, method.index.labels[idx], w)
        mixed = (w[..., None] * method.index.keys[idx]).sum(1)
        tokens = method.vision.layers()
        first = tokens[0][None] + method.retrieval_proj(mixed)[:, None, :]
        feats = tiny_backbone.encode_image(images, prompts=first, deep_prompts=[first, *tokens[1:]])
        z = tiny_backbone.logits(feats, method.text_features)
        expect = torch.log(0.6 * torch.softmax(z, -1) + 0.4 * vote)
        assert torch.allclose(method.predict(images), expect, atol=1e-5)
        assert torch.allclose(torch.softmax(method.predict(images), -1).sum(-1), torch.ones(3), atol=1e-5)


def _indexed_images(method, dm):
    """The training images in index order, through the test transform (as the keys were made)."""
    items = training_items(method, dm, "reprompt")
    loader = dm.dataloader(items, dm.test_transform(), len(items))
    images, labels = next(iter(loader))
    assert torch.equal(labels, method.index.labels)
    return images


def test_a_training_query_never_retrieves_itself_but_an_evaluation_query_does(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    method = _reprompt(tiny_backbone, dm, k=3)
    images = _indexed_images(method, dm)
    own = torch.arange(len(images))
    method.eval()
    _, idx = method.retrieve(images)
    assert torch.equal(idx[:, 0], own)  # each image's own entry is its nearest
    method.train()
    _, idx = method.retrieve(images)
    assert not (idx == own[:, None]).any()
    assert idx.shape == (len(images), 3)


def test_the_index_is_built_once_and_reused(tiny_backbone, tiny_datamodule, monkeypatch):
    dm = tiny_datamodule
    calls = []
    encode = dm.encode
    monkeypatch.setattr(dm, "encode", lambda *a, **kw: calls.append(a) or encode(*a, **kw))
    method = _reprompt(tiny_backbone, dm)
    assert len(calls) == 1
    n = len(training_items(method, dm, "reprompt"))
    assert method.index.keys.shape == (n, tiny_backbone.embed_dim) and method.scalars() == {"index_size": float(n)}
    keys = method.index.keys
    method.setup(dm)  # the same items: kept
    assert len(calls) == 1 and method.index.keys is keys

    def refuse(*a, **kw):
        raise AssertionError("the training set was re-encoded")

    monkeypatch.setattr(dm, "encode", refuse)
    method.train()
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    for _ in range(2):
        images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        opt.zero_grad()
        method.loss(method.output(images), labels).backward()
        opt.step()
    assert method.retrieval_proj.weight.abs().sum() > 0  # the input stage learns
    method.eval()
    method.predict(torch.randn(2, 3, 32, 32))
    assert method.index.keys is keys and torch.equal(method.index.keys, keys)


def test_keys_are_the_normalized_frozen_features_of_the_training_images(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    method = _reprompt(tiny_backbone, dm)
    with torch.no_grad():
        expect = tiny_backbone.encode_image(_indexed_images(method, dm))
    assert torch.allclose(method.index.keys, expect, atol=1e-5)


def test_the_index_travels_with_the_adapter(tiny_backbone, tiny_datamodule, tmp_path):
    from adapt.export import load_adapter, save_adapter

    method = _reprompt(tiny_backbone, tiny_datamodule)
    with torch.no_grad():
        method.retrieval_proj.weight.add_(0.1 * torch.randn_like(method.retrieval_proj.weight))
    save_adapter(method, tmp_path)
    loaded = load_adapter(tmp_path, backbone=tiny_backbone).eval()  # no setup, no training data
    assert torch.equal(loaded.index.keys, method.index.keys)
    assert torch.equal(loaded.index.labels, method.index.labels)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.predict(images), method.predict(images), atol=1e-6)
    unbuilt = build_method("reprompt", None, tiny_backbone, tiny_datamodule.train_classnames, TEMPLATES)
    with pytest.raises(RuntimeError, match="call setup"):
        unbuilt.predict(images)


def test_novel_classes_are_refused_while_the_vote_is_on(tiny_backbone, tiny_datamodule):
    dm = tiny_datamodule
    other = list(reversed(dm.train_classnames))
    with pytest.raises(ValueError, match=r"cannot classify other class names.*method.knn_weight=0"):
        _reprompt(tiny_backbone, dm).set_classnames(other)
    free = _reprompt(tiny_backbone, dm, knn_weight=0.0)
    free.set_classnames(other)  # the retrieval prompt reads no labels
    assert free.predict(torch.randn(2, 3, 32, 32)).shape == (2, len(other))


@pytest.mark.parametrize("cfg,message", [
    ({"k": 0}, "k .* must be >= 1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"knn_weight": 1.0}, r"knn_weight must be in \[0, 1\)"),
    ({"knn_weight": -0.1}, r"knn_weight must be in \[0, 1\)"),
    ({"n_tokens": 0}, "prompt_from_retrieval=false"),
])
def test_bad_settings_are_refused_with_the_fix(tiny_backbone, cfg, message):
    with pytest.raises(ValueError, match=message):
        build_method("reprompt", cfg, tiny_backbone, ["a", "b"], TEMPLATES)


def test_every_class_needs_training_images_for_the_index(tiny_backbone, tiny_datamodule):
    method = build_method("reprompt", None, tiny_backbone, [*tiny_datamodule.train_classnames, "magenta"],
                          TEMPLATES)
    with pytest.raises(ValueError, match="none of 1 class.*magenta"):
        method.setup(tiny_datamodule)


def test_a_base_to_novel_run_is_refused_before_training(image_folder, tmp_path):
    from pathlib import Path

    from adapt.config import load_recipe
    from adapt.run import Experiment
    from tests.conftest import tiny_overrides

    recipe = Path(__file__).resolve().parents[1] / "recipes/reprompt/fewshot.yaml"
    over = tiny_overrides(image_folder, tmp_path, method="reprompt") + ["data.setting=base2novel"]
    with pytest.raises(ValueError, match="novel classes.*method.knn_weight=0"):
        Experiment(load_recipe(recipe, over))
