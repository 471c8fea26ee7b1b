"""CoCoOp, KgCoOp and VP: their defining behaviours, short fits and base-to-novel runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import load_recipe
from adapt.methods import build_method
from adapt.methods.vp import frame_width
from adapt.run import Experiment, run_fit
from tests.conftest import CLASSES, make_backbone, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEMPLATE = ["a photo of a {}."]


def _perturb(params, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p))


# ------------------------------------------------------------------------------ CoCoOp --------
def test_cocoop_with_zero_meta_net_output_is_coop(tiny_backbone):
    torch.manual_seed(0)
    cocoop = build_method("cocoop", None, tiny_backbone, CLASSES, TEMPLATE).eval()
    coop = build_method("coop", {"ctx_init": "a photo of a"}, tiny_backbone, CLASSES, TEMPLATE).eval()
    _perturb([cocoop.prompts.ctx], 0.05)
    with torch.no_grad():
        coop.prompts.ctx.copy_(cocoop.prompts.ctx)
    feats = F.normalize(torch.randn(5, tiny_backbone.embed_dim), dim=-1)
    with torch.no_grad():
        conditioned = cocoop.forward_features(feats)
        cocoop.meta_net[-1].weight.zero_()
        cocoop.meta_net[-1].bias.zero_()
        unconditioned = cocoop.forward_features(feats)
        reference = coop.forward_features(feats)
    assert (unconditioned - reference).abs().max() <= 1e-5
    assert (conditioned - reference).abs().max() > 1e-3  # the meta-net does change the logits


def _per_image_reference(method, feats: torch.Tensor) -> torch.Tensor:
    """The original's loop: for each image, shift the context, build every class's prompt from
    the hand-written sentence's token embeddings, encode, classify that one image."""
    bb = method.backbone
    tokens = bb.tokenize([f"a photo of a {c}." for c in method.classnames])
    emb = bb.embed_tokens(tokens)
    m = method.prompts.n_ctx
    rows = []
    for f in feats:
        ctx = method.prompts.ctx + method.meta_net(f)  # [M, D] + [D]
        x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), emb[:, 1 + m:]], dim=1)
        text = bb.encode_text_embeddings(x, tokens)
        rows.append(bb.logit_scale * f @ text.t())
    return torch.stack(rows)


@pytest.mark.parametrize("max_prompts", [0, 10])  # 10: groups of one image (6 classes each)
def test_vectorised_cocoop_equals_a_per_image_loop(tiny_backbone, max_prompts):
    torch.manual_seed(1)
    cocoop = build_method("cocoop", {"max_prompts_per_pass": max_prompts}, tiny_backbone, CLASSES,
                          TEMPLATE).eval()
    _perturb(cocoop.trainable_parameters(), 0.2, seed=1)
    feats = F.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    with torch.no_grad():
        got = cocoop.forward_features(feats)
        ref = _per_image_reference(cocoop, feats)
    assert got.shape == (4, len(CLASSES))
    assert (got - ref).abs().max() <= 1e-5
    # each image has its own prompts: one image's logits depend on nothing but that image
    with torch.no_grad():
        alone = cocoop.forward_features(feats[2:3])
    assert (alone - got[2:3]).abs().max() <= 1e-5


def test_cocoop_gradients_reach_context_and_meta_net(tiny_backbone):
    cocoop = build_method("cocoop", None, tiny_backbone, CLASSES, TEMPLATE).train()
    feats = F.normalize(torch.randn(3, tiny_backbone.embed_dim), dim=-1)
    cocoop.loss(cocoop.forward_features(feats), torch.tensor([0, 1, 2])).backward()
    for name, p in cocoop.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    hidden = tiny_backbone.embed_dim // 16
    assert cocoop.meta_net[0].weight.shape == (hidden, tiny_backbone.embed_dim)
    assert cocoop.meta_net[-1].weight.shape == (tiny_backbone.text_width, hidden)


def test_cocoop_repointed_to_novel_names_equals_building_for_them(tiny_backbone):
    torch.manual_seed(2)
    base = build_method("cocoop", None, tiny_backbone, CLASSES[:3], TEMPLATE).eval()
    _perturb(base.trainable_parameters(), 0.1, seed=2)
    novel = build_method("cocoop", None, tiny_backbone, CLASSES[3:], TEMPLATE).eval()
    novel.load_trainable_state(base.trainable_state())
    base.set_classnames(CLASSES[3:])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(base(images), novel(images), atol=1e-6)


# ------------------------------------------------------------------------------ KgCoOp --------
def test_kgcoop_term_is_zero_at_the_hand_written_prompt_and_grows_when_perturbed(tiny_backbone):
    kg = build_method("kgcoop", None, tiny_backbone, CLASSES, TEMPLATE)
    assert kg.prompts.n_ctx == 4 and kg.config.weight == 8.0
    with torch.no_grad():
        assert kg.knowledge_loss().abs() <= 1e-6
    _perturb([kg.prompts.ctx], 0.05)
    with torch.no_grad():
        term = kg.knowledge_loss()
    assert term > 1e-4
    # the training loss is CE + λ·term, with the text features of the same forward pass
    kg.train()
    feats = F.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    labels = torch.tensor([0, 1, 2, 3])
    logits = kg.forward_features(feats)
    loss = kg.loss(logits, labels)
    assert torch.allclose(loss, F.cross_entropy(logits, labels) + 8.0 * term, atol=1e-5)


def test_kgcoop_anchor_is_the_dataset_template(tiny_backbone):
    # another hand-written prompt than the context's own text: the term is positive at init
    kg = build_method("kgcoop", None, tiny_backbone, CLASSES, ["a drawing of a {}."])
    with torch.no_grad():
        assert kg.knowledge_loss() > 1e-4
    # and it follows the class list: rebuilt (never saved) for novel classes
    kg.set_classnames(CLASSES[:2])
    assert kg.handcrafted().shape == (2, tiny_backbone.embed_dim)
    assert not any("handcrafted" in k for k in kg.trainable_state())


# ------------------------------------------------------------------------------ VP ------------
def test_vp_zero_prompt_gives_exactly_the_zero_shot_logits(tiny_backbone):
    vp = build_method("vp", None, tiny_backbone, CLASSES, TEMPLATE).eval()
    zs = build_method("zeroshot", None, tiny_backbone, CLASSES, TEMPLATE).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(vp(images), zs(images))  # N(0, 1) init, as the original
        for p in vp.trainable_parameters():
            p.zero_()
        assert torch.equal(vp(images), zs(images))


def test_vp_prompt_touches_only_the_border(tiny_backbone):
    vp = build_method("vp", None, tiny_backbone, CLASSES, TEMPLATE)
    pad, size = vp.pad, tiny_backbone.image_size
    assert pad == 4  # 30 px at 224 px, scaled to a 32 px input
    centre = (slice(None), slice(None), slice(pad, size - pad), slice(pad, size - pad))
    border = torch.ones(1, 3, size, size, dtype=torch.bool)
    border[centre] = False
    images = torch.randn(2, 3, size, size)
    prompted = vp.apply_prompt(images)
    assert torch.equal(prompted[centre], images[centre])
    assert ((prompted - images).abs() > 0).expand_as(images)[border.expand_as(images)].all()
    # no parameter reaches a centre pixel: the gradient of any function of the centre is zero
    weights = torch.randn_like(images)
    grads = torch.autograd.grad((prompted[centre] * weights[centre]).sum(), vp.trainable_parameters(),
                                allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad((prompted * weights * border).sum(), vp.trainable_parameters())
    assert all(g.abs().min() > 0 for g in grads)
    n_params = sum(p.numel() for p in vp.trainable_parameters())
    assert n_params == 2 * 3 * pad * size + 2 * 3 * (size - 2 * pad) * pad


def test_vp_frame_width_scales_and_keeps_a_centre():
    assert frame_width(30, 224) == 30
    assert frame_width(30, 336) == 45
    assert frame_width(30, 32) == 4
    assert frame_width(30, 8) == 1
    assert frame_width(100, 32, scale=False) == 15  # clamped: a 2 px centre remains
    assert frame_width(30, 3) == 1 and frame_width(0, 224) == 0


def test_vp_runs_on_a_resnet_tower():
    rn = make_backbone("test-rn")
    vp = build_method("vp", None, rn, CLASSES, TEMPLATE).train()
    logits = vp(torch.randn(2, 3, 32, 32))
    vp.loss(logits, torch.tensor([0, 1])).backward()
    assert logits.shape == (2, len(CLASSES))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vp.trainable_parameters())


def test_vp_refuses_images_of_another_size(tiny_backbone):
    vp = build_method("vp", None, tiny_backbone, CLASSES, TEMPLATE)
    with pytest.raises(ValueError, match="built for 3x32x32"):
        vp(torch.randn(1, 3, 48, 48))


# ------------------------------------------------------------------------------ fits ----------
def _train_loss(exp: Experiment) -> float:
    """The method's own training objective over the few-shot images, without augmentation."""
    exp.method.eval()
    loader = exp.data.dataloader(exp.data.train_items, exp.data.test_transform(), 64)
    with torch.no_grad():
        total = sum(float(exp.method.loss(exp.method(x), y)) * len(y) for x, y in loader)
    return total / len(exp.data.train_items)


# lr per method for a seconds-long fit of the random tiny backbone (nothing here is a paper
# setting); KgCoOp starts at its hand-written prompt, where its regularizer is at its minimum
FITS = {
    "cocoop": {"optim.lr": 0.05, "trainer.max_epochs": 4},
    "kgcoop": {"optim.lr": 0.0005, "trainer.max_epochs": 8},
    "vp": {"optim.lr": 40.0, "trainer.max_epochs": 4},
}


@pytest.mark.parametrize("name", sorted(FITS))
def test_short_fit_lowers_the_training_loss(name, image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, name, **{
        "optim.warmup_epochs": 0, "data.cache_dir": str(tmp_path / "features"), **FITS[name]})
    exp = Experiment(load_recipe(RECIPES / name / "fewshot.yaml", over))
    assert exp.inputs == ("images" if name == "vp" else "features")
    frozen = {k: v.clone() for k, v in exp.backbone.state_dict().items()}
    batches = []
    forward = exp.method.forward_features if name != "vp" else exp.method.forward
    def record(x, *rest):  # batch sizes as the method receives them
        batches.append(len(x))
        return forward(x, *rest)

    if name == "vp":
        exp.method.forward = record
    else:
        exp.method.forward_features = record
    before = _train_loss(exp)
    # Lightning (>= 2.2) keeps each submodule's mode at fit start; a fresh run's method is in train mode
    exp.method.train()
    batches.clear()
    exp.fit()
    assert max(batches) == 8  # the recipe's batch size reaches the method whole
    after = _train_loss(exp)
    assert after < before - 0.05, (before, after)
    for k, v in exp.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), f"backbone tensor {k} changed"


@pytest.mark.parametrize("name", sorted(FITS))
def test_base_to_novel_run(name, image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, name, **{
        "trainer.max_epochs": 1, "data.cache_dir": str(tmp_path / "features"), "run_name": "b2n"})
    recipe = load_recipe(RECIPES / name / "base2novel.yaml", over)
    assert recipe.data.setting == "base2novel"
    results = run_fit(recipe)
    m = results["metrics"]
    assert set(m) == {"base_acc", "novel_acc", "hm"}
    assert all(0.0 <= v <= 100.0 for v in m.values())
    assert results["classes"] == {"base": 3, "novel": 3}
    assert (tmp_path / "b2n" / "adapter" / "adapter.safetensors").is_file()
