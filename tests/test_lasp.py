"""LASP: text-to-text regularisation, the learned text bias, image LayerNorms at 0.1x the lr.

Pinned: at initialisation it is zero-shot CLIP on "a photo of a {}."; L_tt by hand (each template
feature classified over the learned prompts), with the original's noise draws; which classes
L_tt covers (training only by default, the dataset's others with ``t2t_classes: all``, never
after re-pointing); the ``norms`` group at 0.1x through the engine and its recipe override; and,
with a checkout of 1adrianb/lasp named by ``ADAPT_LASP_REPO``, the original's loss and gradients.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adapt.config import OptimConfig
from adapt.engine import AdaptModule
from adapt.methods import build_method
from adapt.methods.base import zero_shot_text_features
from tests.conftest import CLASSES, make_backbone

NAMES = CLASSES[:4]
TEMPLATE = ["a drawing of a {}."]


def _lasp(backbone, **cfg):
    torch.manual_seed(0)
    return build_method("lasp", cfg or None, backbone, NAMES, TEMPLATE)


def test_at_initialisation_it_is_zero_shot_clip_on_its_init_prompt(tiny_backbone):
    method = _lasp(tiny_backbone).eval()
    images = torch.randn(3, 3, 32, 32)
    zs = tiny_backbone.logits(tiny_backbone.encode_image(images), zero_shot_text_features(
        tiny_backbone, NAMES, ["a photo of a {}."]))
    with torch.no_grad():
        assert torch.allclose(method(images), zs, atol=1e-4)
    owned = set(method.backbone_state())
    assert owned and all(".visual." in n and (".ln_1." in n or ".ln_2." in n) for n in owned)
    assert len(owned) == 4 * len(tiny_backbone.model.visual.transformer.resblocks)  # weight + bias, two per block


def _by_hand(text, h, scale):
    losses = [F.cross_entropy(scale * text @ h[p, j], torch.tensor(j)) for p in range(h.shape[0])
              for j in range(h.shape[1])]
    return torch.stack(losses).mean()


def test_text_to_text_loss_classifies_each_template_feature_over_the_learned_prompts(tiny_backbone):
    method = _lasp(tiny_backbone, noise_prob=0.0, templates_t2t=["a photo of a {}.", "art of the {}.", "{}."])
    with torch.no_grad():
        method.prompts.ctx.normal_(0, 0.2)
        method.bias.normal_(0, 0.1)
    text = method.all_text_features()
    h = torch.stack([zero_shot_text_features(tiny_backbone, NAMES, [t]) for t in method.config.templates_t2t])
    assert torch.allclose(method.references(), h)
    tt = method.text_to_text_loss(text)
    assert float(tt) == pytest.approx(float(_by_hand(text, h, tiny_backbone.logit_scale).detach()), rel=1e-5)
    # the noise: a coin, then N(0, 1) · 0.05 on the normalized features, not renormalized
    noisy = _lasp(tiny_backbone, noise_prob=1.0, templates_t2t=method.config.templates_t2t)
    torch.manual_seed(3)
    got = noisy.text_to_text_loss(text)
    torch.manual_seed(3)
    torch.rand(1)
    expect = _by_hand(text, h + 0.05 * torch.randn_like(h), tiny_backbone.logit_scale)
    assert float(got) == pytest.approx(float(expect), rel=1e-5) and float(got) != pytest.approx(float(tt))


def test_t2t_covers_the_training_classes_or_with_all_the_datasets_others(tiny_backbone):
    dm = SimpleNamespace(dataset=SimpleNamespace(classnames=CLASSES))
    plain = _lasp(tiny_backbone)
    plain.setup(dm)
    assert plain.extra_classnames == [] and plain.references().shape[1] == 4
    virtual = _lasp(tiny_backbone, t2t_classes="all")
    virtual.setup(dm)
    assert virtual.extra_classnames == CLASSES[4:] and virtual.references().shape[1] == 6
    out = virtual.train().output(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 4) and out.tensors["text_features"].shape[0] == 6
    virtual.set_classnames(CLASSES[4:])  # evaluation on novel classes: no extra names left
    assert virtual.extra_classnames == [] and virtual.prompts.tokens.shape[0] == 2


def test_norms_train_at_a_tenth_of_the_lr_unless_the_recipe_says_otherwise(tiny_backbone):
    optim = {**dataclasses.asdict(OptimConfig()), "lr": 0.032}
    module = AdaptModule("lasp", None, NAMES, TEMPLATE, {"name": "adapt-tiny-vit"}, optim, 25,
                         prebuilt_backbone=tiny_backbone)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert groups["norms"]["lr"] == pytest.approx(0.0032 * 1e-5 / 0.032)  # warm-up epoch: the factor applies to both
    assert groups["prompt"]["lr"] == pytest.approx(1e-5)
    assert groups["norms"]["initial_lr"] == pytest.approx(0.0032) and groups["prompt"]["initial_lr"] == 0.032
    same = AdaptModule("lasp", None, NAMES, TEMPLATE, {"name": "adapt-tiny-vit"},
                       {**optim, "groups": {"norms": {"lr_scale": 1.0}}}, 25, prebuilt_backbone=tiny_backbone)
    same.trainer = module.trainer
    assert {g["name"]: g["initial_lr"] for g in same.configure_optimizers()["optimizer"].param_groups} == {
        "prompt": 0.032, "norms": 0.032}
    with pytest.raises(ValueError, match="optim.groups names ln, but lasp's parameter groups are: prompt, norms"):
        AdaptModule("lasp", None, NAMES, TEMPLATE, {"name": "adapt-tiny-vit"},
                    {**optim, "groups": {"ln": {"lr_scale": 1.0}}}, 25, prebuilt_backbone=tiny_backbone)


def test_its_base_to_novel_recipe_fits_beside_a_zero_shot_baseline(image_folder, tmp_path):
    """The recipe's optim.groups are LASP's: the zero-shot baseline built from the same recipe
    does not inherit them, and t2t_classes=all sees the novel names in training only."""
    import json

    from adapt.config import load_recipe
    from adapt.run import run_fit
    from tests.conftest import tiny_overrides

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/lasp/base2novel.yaml",
                         tiny_overrides(image_folder, tmp_path, "lasp", **{"baseline": "true",
                                                                            "method.t2t_classes": "all"}))
    res = run_fit(recipe)
    assert set(res["metrics"]) >= {"base_acc", "novel_acc", "hm"} and res["zeroshot_metrics"]["hm"] > 0
    assert res["scalars"]["t2t"] > 0 and res["scalars"]["ce"] > 0
    meta = json.loads(next(tmp_path.rglob("adapter.json")).read_text())
    assert len(meta["classnames"]) == 3  # the adapter holds the base classes, not L_tt's extra names


REPO = os.environ.get("ADAPT_LASP_REPO")


@pytest.mark.skipif(not REPO, reason="set ADAPT_LASP_REPO to a checkout of 1adrianb/lasp")
@pytest.mark.parametrize("t2t_classes", ["train", "all"])
def test_loss_and_gradients_match_the_original(t2t_classes, capsys):
    from experiments.original_coop import round_to_fp16
    from experiments.original_lasp import OriginalLASP

    names = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]
    train = names[:4]
    bb = make_backbone("test-vit-openai-77-e64")  # embedding = text width, as ViT-B/16 (the original's w needs it)
    round_to_fp16(bb)
    templates = ["a photo of a {}.", "a bad photo of the {}.", "art of the {}.", "a bad photo of the {}."]
    theirs = OriginalLASP(REPO, bb).lasp(train, names if t2t_classes == "all" else train, templates)
    assert "Num classes used for LASP" in capsys.readouterr().out  # the original's own constructor ran
    ours = build_method("lasp", {"templates_t2t": templates, "t2t_classes": t2t_classes}, bb, train,
                        ["a photo of a {}."]).train()
    ours.setup(SimpleNamespace(dataset=SimpleNamespace(classnames=names)))
    learner = theirs.prompt_learner
    assert torch.equal(learner.ctx.detach(), ours.prompts.ctx.detach())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # values away from the initialisation, the same in both
        ours.prompts.ctx.normal_(0, 0.1, generator=g)
        ours.bias.normal_(0, 0.05, generator=g)
        learner.ctx.copy_(ours.prompts.ctx)
        learner.w.copy_(ours.bias[None])
        norms = dict(ours.backbone.named_parameters())
        for name, p in theirs.image_encoder.named_parameters():
            if ".ln_1." in name or ".ln_2." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
                norms["model.visual." + name].copy_(p)
    images, labels = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 1])
    for seed in (0, 1):  # seed 0 draws the noise, seed 1 does not (the coin)
        torch.manual_seed(seed)
        loss_theirs = theirs(images, labels)
        torch.manual_seed(seed)
        loss_ours = ours.loss(ours.output(images), labels)
        assert float(loss_ours) == pytest.approx(float(loss_theirs), rel=1e-5), seed
        theirs.zero_grad(), ours.zero_grad()
        loss_theirs.backward(), loss_ours.backward()
        pairs = [(learner.ctx.grad, ours.prompts.ctx.grad), (learner.w.grad[0], ours.bias.grad)]
        pairs += [(p.grad, norms["model.visual." + n].grad) for n, p in theirs.image_encoder.named_parameters()
                  if ".ln_1." in n or ".ln_2." in n]
        assert len(pairs) == 2 + 8
        for a, b in pairs:
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), seed
