"""The test-time family: TPT (from a hand-written prompt or a trained adapter), Zero, TDA, DMN-ZS;
episodic methods leave nothing behind, online methods follow a seeded stream."""
from __future__ import annotations

import json
import math
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import load_recipe
from adapt.data.sharding import StreamSampler, stream_loader
from adapt.engine import check_test_time_world
from adapt.export import save_adapter
from adapt.methods import build_method, list_methods
from adapt.methods.views import confident
from adapt.run import Experiment, run_fit
from tests.conftest import CLASSES, tiny_overrides, write_image_folder

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
TRAIN, EVAL = CLASSES[:4], CLASSES[1:]  # adapters are re-pointed at other classes


def _images(n=4, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 32, 32)


def _adapter(name, backbone, tmp_path, **cfg):
    """An exported adapter whose learned tensors moved away from their initialisation."""
    torch.manual_seed(1)
    method = build_method(name, cfg, backbone, TRAIN, TEMPLATES)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_adapter(method, tmp_path / name)
    return tmp_path / name


def test_every_test_time_method_declares_its_mode():
    from adapt.methods import get_method
    modes = {n: get_method(n).test_time for n in list_methods()}
    assert {n: m for n, m in modes.items() if m} == {"tpt": "episodic", "zero": "episodic",
                                                      "tda": "online", "dmn": "online"}


# ------------------------------------------------------------------ TPT from an adapter --------
@pytest.mark.parametrize("source", ["coop", "cocoop", "maple"])
def test_tpt_with_lr_zero_equals_the_adapter_it_starts_from(source, tiny_backbone, tmp_path):
    from adapt.export import load_adapter

    path = _adapter(source, tiny_backbone, tmp_path)
    ref = load_adapter(path, backbone=tiny_backbone, classnames=EVAL).eval()
    images = _images(3)
    with torch.no_grad():
        want = ref.predict(images)
    tpt = build_method("tpt", {"init_from": str(path), "lr": 0.0, "n_views": 8, "seed": 1},
                       tiny_backbone, TRAIN, TEMPLATES).eval()
    tpt.set_classnames(EVAL)  # the runner re-points at each evaluation set
    assert (tpt.predict(images) - want).abs().max() <= 1e-4
    tuned = build_method("tpt", {"init_from": str(path), "lr": 0.05, "n_views": 8, "seed": 1},
                         tiny_backbone, TRAIN, TEMPLATES).eval()
    tuned.set_classnames(EVAL)
    assert (tuned.predict(images) - want).abs().max() > 1e-4  # the step does move the adapter


@pytest.mark.parametrize("source", ["coop", "maple"])
def test_tpt_from_an_adapter_restores_it_before_every_image(source, tiny_backbone, tmp_path, monkeypatch):
    from adapt.methods.tpt import TPT

    path = _adapter(source, tiny_backbone, tmp_path)
    tpt = build_method("tpt", {"init_from": str(path), "lr": 0.05, "n_views": 8, "seed": 1},
                       tiny_backbone, TRAIN, TEMPLATES).eval()
    initial = {k: v.clone() for k, v in tpt.initial.items()}
    starts = []  # the adapter's learned tensors as each image's tuning begins
    hook = "tune" if source == "coop" else "tune_source"
    original = getattr(TPT, hook)

    def spy(self, *args):
        starts.append({n: p.detach().clone() for n, p in self.source.named_parameters() if n in initial})
        if source == "coop":
            starts[-1]["ctx0"] = args[1].detach().clone()
        return original(self, *args)

    monkeypatch.setattr(TPT, hook, spy)
    images = _images(3)
    both = tpt.predict(images)
    assert len(starts) == 3
    for state in starts:
        for name, value in initial.items():
            assert torch.equal(state[name], value), name
        if source == "coop":
            assert torch.equal(state["ctx0"], initial["prompts.ctx"])
    after = dict(tpt.source.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in initial.items())
    assert not tpt.is_trainable  # nothing trains before test
    # predictions do not depend on the order of the images
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(tpt.predict(images[perm]), both[perm], atol=1e-5)


def test_tpt_init_from_takes_a_run_directory_and_names_a_bad_path(tiny_backbone, tmp_path):
    path = _adapter("coop", tiny_backbone, tmp_path / "run")
    (tmp_path / "run" / "coop").rename(tmp_path / "run" / "adapter")
    tpt = build_method("tpt", {"init_from": str(tmp_path / "run"), "seed": 1}, tiny_backbone, TRAIN, TEMPLATES)
    assert tpt.source.name == "coop" and not path.exists()
    with pytest.raises(FileNotFoundError, match="method.init_from=.*run directory of a finished"):
        build_method("tpt", {"init_from": str(tmp_path / "nothing")}, tiny_backbone, TRAIN, TEMPLATES)


def test_tpt_on_a_coop_run_directory_from_its_recipe(tmp_path):
    root = write_image_folder(tmp_path / "images", per_split={"train": 2, "test": 2})
    coop = run_fit(load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        root, tmp_path, **{"trainer.max_epochs": 1, "data.shots": 2, "run_name": "coop", "method.n_ctx": 4})))
    over = tiny_overrides(root, tmp_path, method="tpt", **{
        "method.n_views": 4, "data.shots": 1, "run_name": "tpt", "method.init_from": coop["run_dir"]})
    res = run_fit(load_recipe(RECIPES / "tpt/test_time.yaml", over))
    assert res["test_time"] == {"mode": "episodic"} and res["trainable_params"] == 0
    assert 0.0 <= res["metrics"]["test_acc"] <= 100.0


# ------------------------------------------------------------------ episodic -------------------
@pytest.mark.parametrize("name", ["tpt", "zero"])
def test_episodic_predictions_do_not_depend_on_test_order(name, tiny_backbone):
    method = build_method(name, {"n_views": 8, "seed": 1}, tiny_backbone, EVAL, TEMPLATES).eval()
    images = _images(5, seed=3)
    ref = method.predict(images)
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert torch.allclose(method.predict(images[perm]), ref[perm], atol=1e-5)
    assert torch.allclose(method.predict(images[3:4]), ref[3:4], atol=1e-5)


def test_the_engine_resets_an_episodic_method_after_every_image(tiny_backbone):
    import dataclasses
    import types

    from adapt.config import OptimConfig
    from adapt.engine import AdaptModule

    module = AdaptModule("zero", {"n_views": 4, "seed": 1}, EVAL, TEMPLATES,
                         dataclasses.asdict(tiny_backbone.config), dataclasses.asdict(OptimConfig()), 0,
                         prebuilt_backbone=tiny_backbone)
    method = module.method.eval()
    calls = []
    method.reset_test_state = lambda: calls.append("reset")
    original = method.predict
    method.predict = lambda x: (calls.append(len(x)), original(x))[1]
    module.eval_metric = types.SimpleNamespace(update=lambda logits, y: None)
    module.log = lambda *a, **k: None
    module._eval_step((_images(3), torch.tensor([0, 1, 2])), "test")
    assert calls == [1, "reset"] * 3


# ------------------------------------------------------------------ Zero -----------------------
def test_zero_with_gamma_one_and_one_view_is_zero_shot(tiny_backbone):
    images = _images(6, seed=5)
    zs = build_method("zeroshot", None, tiny_backbone, EVAL, TEMPLATES).eval()
    zero = build_method("zero", {"gamma": 1.0, "n_views": 1, "seed": 1}, tiny_backbone, EVAL, TEMPLATES).eval()
    with torch.no_grad():
        want = zs.predict(images).argmax(-1)
    votes = zero.predict(images)
    assert torch.equal(votes.argmax(-1), want)
    assert torch.equal(votes, F.one_hot(want, len(EVAL)).float())


def test_zero_votes_with_the_most_confident_views(tiny_backbone):
    zero = build_method("zero", {"seed": 1}, tiny_backbone, EVAL, TEMPLATES).eval()
    image = _images(1, seed=6)[0]
    with torch.no_grad():
        logits = zero.forward_features(tiny_backbone.encode_image(zero_views := _views(zero, image)))
    assert len(zero_views) == 64
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    kept = torch.argsort(ent)[:19]  # int(64 · 0.3)
    counts = torch.bincount(logits[kept].argmax(-1), minlength=len(EVAL)).float()
    votes = zero.predict(image[None])[0]
    tied = (counts == counts.max()).sum() > 1
    assert float(votes.sum()) == 19 + int(tied)
    assert torch.equal(votes - (votes > counts).float(), counts)  # the winner's extra vote on a tie
    assert not votes.requires_grad and votes.grad_fn is None  # forward passes only


def _views(method, image):
    from adapt.methods.views import test_views
    return test_views(image, method.config, method.backbone.image_mean, method.backbone.image_std)


# ------------------------------------------------------------------ TDA ------------------------
def _reference_tda(feats, text, scale, cfg):
    """kdiAAA/TDA's run_test_tda on a stream of normalized features, with its dict-of-lists
    caches (update_cache / compute_cache_logits), literally."""
    def update(cache, pred, item, cap):
        if pred in cache:
            if len(cache[pred]) < cap:
                cache[pred].append(item)
            elif item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        else:
            cache[pred] = [item]

    def cache_logits(f, cache, alpha, beta, neg=None):
        keys, values = [], []
        for c in sorted(cache):
            for item in cache[c]:
                keys.append(item[0])
                values.append(item[2] if neg else F.one_hot(torch.tensor(c), len(text)).float()[None])
        keys, values = torch.cat(keys).t(), torch.cat(values)
        if neg:
            values = ((values > neg[0]) & (values < neg[1])).float()
        return alpha * (torch.exp(-(beta - beta * (f @ keys))) @ values)

    pos, neg, out = {}, {}, []
    for f in feats:
        f = f[None]
        logits = scale * f @ text.t()
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        pred = int(logits.argmax())
        update(pos, pred, [f, loss], cfg["pos_shot_capacity"])
        if 0.2 < float(loss / math.log2(len(text))) < 0.5:
            update(neg, pred, [f, loss, logits.softmax(1)], cfg["neg_shot_capacity"])
        final = logits.clone()
        if pos:
            final += cache_logits(f, pos, 2.0, 5.0)
        if neg:
            final -= cache_logits(f, neg, 0.117, 1.0, (0.03, 1.0))
        out.append(final)
    return torch.cat(out), neg


def _stream(tda, n=40, seed=0):
    """Features near the class text features at varied distances (a spread of confidences)."""
    gen = torch.Generator().manual_seed(seed)
    text = tda.text_features
    labels = torch.randint(len(text), (n,), generator=gen)
    noise = torch.randn(n, text.shape[1], generator=gen) * torch.linspace(0.02, 0.3, n)[:, None]
    return F.normalize(text[labels] + noise, dim=-1)


def test_tda_follows_the_original_caches_along_a_stream(tiny_backbone):
    tda = build_method("tda", None, tiny_backbone, EVAL, TEMPLATES).eval()
    feats = _stream(tda)
    got = tda.predict(feats)
    want, neg = _reference_tda(feats, tda.text_features, float(tiny_backbone.logit_scale), {
        "pos_shot_capacity": 3, "neg_shot_capacity": 2})
    assert neg, "the stream should fill the negative cache too"
    assert torch.allclose(got, want, atol=1e-4)
    zs = tiny_backbone.logits(feats, tda.text_features)
    assert (got - zs).abs().max() > 0.1  # the caches do change the logits


def test_tda_with_empty_caches_is_zero_shot(tiny_backbone):
    zs = build_method("zeroshot", {"ensemble": True}, tiny_backbone, EVAL, TEMPLATES).eval()
    tda = build_method("tda", {"pos_shot_capacity": 0, "neg_shot_capacity": 0}, tiny_backbone, EVAL,
                       TEMPLATES).eval()
    images = _images(5)
    with torch.no_grad():
        assert torch.allclose(tda.predict(images), zs.predict(images), atol=1e-5)


def test_online_state_carries_along_the_stream_and_resets(tiny_backbone):
    tda = build_method("tda", None, tiny_backbone, EVAL, TEMPLATES).eval()
    feats = _stream(tda, n=12)
    whole = tda.predict(feats)
    tda.reset_test_state()
    assert torch.allclose(tda.predict(feats[:6]), whole[:6])
    assert torch.allclose(tda.predict(feats[6:]), whole[6:])  # the cache carried over
    tda.reset_test_state()
    assert not torch.allclose(tda.predict(feats[6:]), whole[6:])  # fresh caches differ


# ------------------------------------------------------------------ DMN-ZS ---------------------
def test_dmn_memory_prediction_on_the_first_images(tiny_backbone):
    dmn = build_method("dmn", {"n_views": 8, "seed": 1}, tiny_backbone, EVAL, TEMPLATES).eval()
    images = _images(2, seed=7)
    out = dmn.predict(images)
    # reference for image 1 and 2: by hand, from the views' features
    text, scale = dmn.text_features, float(tiny_backbone.logit_scale)
    memory = {c: [] for c in range(len(EVAL))}
    for image, got in zip(images, out):
        with torch.no_grad():
            feats = tiny_backbone.encode_image(_views(dmn, image))
        probs = (scale * feats @ text.t()).softmax(-1)
        mean = probs[confident(scale * feats @ text.t(), 0.1)].mean(0)  # int(8 · 0.1) -> 1 view
        memory[int(mean.argmax())].append(feats[0])
        classifier = []
        for c in range(len(EVAL)):
            slots = torch.stack(memory[c] + [text[c]])
            w = torch.exp(-5.5 * (1 - slots @ feats[0]))
            classifier.append(F.normalize((w[:, None] * slots).sum(0), dim=-1))
        mem_probs = (scale * feats[0] @ torch.stack(classifier).t()).softmax(-1)
        assert torch.allclose(got, probs[0] + mem_probs, atol=1e-5)
    assert int(dmn.count.sum()) == 2


def test_dmn_memory_keeps_the_lowest_entropy_entries(tiny_backbone):
    dmn = build_method("dmn", {"memory_size": 2, "n_views": 1}, tiny_backbone, EVAL, TEMPLATES)
    f = F.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    for i, h in enumerate([0.5, 0.3, 0.4, 0.9]):
        dmn.remember(1, f[i], torch.tensor(h))
    assert int(dmn.count[1]) == 2
    assert torch.equal(dmn.memory[1], torch.stack([f[2], f[1]]))  # 0.5 swapped out by 0.4, 0.9 refused
    assert dmn.memory[0].abs().sum() == 0


# ------------------------------------------------------------------ the stream -----------------
def test_stream_order_is_fixed_by_the_seed():
    a, b, c = (StreamSampler(50, s).order() for s in (1, 1, 2))
    assert a == b and a != c and sorted(a) == list(range(50))


def test_online_run_same_seed_same_stream_other_seed_other_order(tmp_path, monkeypatch):
    from adapt.methods.tda import TDA

    root = write_image_folder(tmp_path / "images", per_split={"train": 1, "test": 5})
    seen: list[list[float]] = []
    original = TDA.step
    def spy(self, f):
        out = original(self, f)
        seen[-1].append((round(float(f.sum()), 5), round(float(out.sum()), 4)))  # image, prediction
        return out

    monkeypatch.setattr(TDA, "step", spy)
    results = []
    for i, seed in enumerate([1, 1, 2]):
        seen.append([])
        # the shipped pretrained tiny CLIP: its weights, unlike random ones, do not follow the seed
        over = tiny_overrides(root, tmp_path, method="tda", **{
            "data.shots": 1, "seed": seed, "run_name": f"r{i}", "data.eval_batch_size": 4,
            "backbone.name": "tiny-vit-p4", "backbone.pretrained": "world"})
        results.append(run_fit(load_recipe(RECIPES / "tda/test_time.yaml", over)))
    assert len(seen[0]) == 30 and seen[0] == seen[1] and seen[0] != seen[2]
    assert sorted(i for i, _ in seen[0]) == sorted(i for i, _ in seen[2])  # the same images, another order
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["test_time"] == {"mode": "online", "stream_seed": 1}
    saved = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert saved["test_time"] == {"mode": "online", "stream_seed": 2}


def test_an_online_method_is_refused_under_ddp(tiny_backbone):
    tda = build_method("tda", None, tiny_backbone, EVAL, TEMPLATES)
    with pytest.raises(RuntimeError, match="tda adapts online.*2 processes.*trainer.devices=1"):
        check_test_time_world(tda, 2)
    check_test_time_world(tda, 1)
    check_test_time_world(build_method("zero", None, tiny_backbone, EVAL, TEMPLATES), 4)  # episodic: fine


@pytest.mark.parametrize("name", ["zero", "dmn"])
def test_recipes_run_on_images(name, tmp_path):
    root = write_image_folder(tmp_path / "images", per_split={"train": 1, "test": 2})
    over = tiny_overrides(root, tmp_path, method=name, **{"data.shots": 1, "method.n_views": 4, "run_name": name})
    res = run_fit(load_recipe(RECIPES / name / "test_time.yaml", over))
    assert res["test_time"]["mode"] == {"zero": "episodic", "dmn": "online"}[name]
    assert 0.0 <= res["metrics"]["test_acc"] <= 100.0 and res["trainable_params"] == 0
    assert "adapter_dir" not in res
