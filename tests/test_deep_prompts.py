"""Deep prompting methods (VPT, IVLP, MaPLe, PromptSRC): exactness, slot replacement, MaPLe's
coupling, PromptSRC's regularisers and GPA, and short fits on the tiny backbone."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import load_recipe
from adapt.methods import build_method
from adapt.methods.promptsrc import gpa_weights
from adapt.run import Experiment, run_fit
from tests.conftest import CLASSES, make_backbone, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEMPLATE = ["a photo of a {}."]
DEEP = ["vpt", "ivlp", "maple", "promptsrc"]


def _images(bb, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)


def _zero_shot(bb, images, classes=CLASSES, templates=TEMPLATE):
    with torch.no_grad():
        return build_method("zeroshot", None, bb, classes, templates).eval()(images)


def _record_block_inputs(blocks):
    """Forward pre-hooks that keep the input of each block; returns (inputs, remove)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, b in enumerate(blocks)]
    return seen, lambda: [h.remove() for h in hooks]


# --------------------------------------------------------------------- zero depth == zero-shot ---
@pytest.mark.parametrize("name,cfg", [
    ("vpt", {"depth": 0}),
    ("vpt", {"n_tokens": 0}),
    ("ivlp", {"text_depth": 0, "vision_depth": 0}),
    # layer-0 text context initialised from "a photo of a" is the hand-written prompt itself
    ("ivlp", {"text_depth": 1, "vision_depth": 0}),
    ("ivlp", {"n_ctx_text": 4, "text_depth": 1, "n_ctx_vision": 0}),
    ("maple", {"depth": 0}),
    ("promptsrc", {"text_depth": 1, "vision_depth": 0}),
])
def test_zero_prompt_depth_equals_zero_shot(tiny_backbone, name, cfg):
    images = _images(tiny_backbone)
    method = build_method(name, cfg, tiny_backbone, CLASSES, TEMPLATE).eval()
    with torch.no_grad():
        assert (method(images) - _zero_shot(tiny_backbone, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", DEEP)
def test_default_prompts_change_the_model(tiny_backbone, name):
    """The exactness test above can fail: with prompts in the towers the logits move."""
    images = _images(tiny_backbone)
    torch.manual_seed(0)
    method = build_method(name, None, tiny_backbone, CLASSES, TEMPLATE).eval()
    with torch.no_grad():
        assert (method(images) - _zero_shot(tiny_backbone, images)).abs().max() > 1e-3


@pytest.mark.parametrize("name", DEEP)
def test_vit_only_methods_refuse_a_resnet_at_build_time(name):
    with pytest.raises(TypeError, match="needs a ViT image tower"):
        build_method(name, None, make_backbone("test-rn"), CLASSES, TEMPLATE)


# --------------------------------------------------------------------- MaPLe ---------------------
def test_maple_init_reads_a_photo_of_a_with_two_learnable_tokens(tiny_backbone):
    bb = tiny_backbone
    maple = build_method("maple", None, bb, ["red panda", "dog"], TEMPLATE)
    ref = bb.embed_tokens(bb.tokenize(["a photo of a red panda.", "a photo of a dog."]))
    got = maple.text.context.embeddings()
    assert maple.text.context.ctx.shape == (2, bb.text_width)
    assert torch.equal(maple.text.context.ctx, ref[0, 1:3])  # "a photo" learnable
    assert torch.equal(got, ref[:, :got.shape[1]])  # "of a" is a fixed part of the prompt
    assert len(maple.couplings) == maple.text.depth == 2  # depth 9 capped at the tiny towers
    deep = maple.text.deep[0]
    assert abs(deep.std().item() - 0.02) < 0.02  # N(0, 0.02), few values on the tiny model


def test_maple_vision_prompts_are_the_coupling_of_its_text_prompts(tiny_backbone):
    bb = tiny_backbone
    torch.manual_seed(0)
    maple = build_method("maple", None, bb, CLASSES, TEMPLATE).eval()
    with torch.no_grad():  # make every layer's text prompts and coupling distinct
        for p in maple.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    visual = bb.model.visual
    seen, remove = _record_block_inputs([visual.ln_pre, *visual.transformer.resblocks])
    images = _images(bb, n=2)
    with torch.no_grad():
        maple(images)
    remove()
    n = maple.config.n_ctx
    text_layers = [maple.text.context.ctx, *maple.text.deep]
    for i, (coupling, text) in enumerate(zip(maple.couplings, text_layers)):
        expected = (text @ coupling.weight.t() + coupling.bias).expand(2, -1, -1)
        # seen[0]: the sequence entering ln_pre (layer 0's prompts), seen[i + 1]: block i's input
        reaching = seen[i + 1] if i > 0 else seen[0]
        assert torch.allclose(reaching[:, -n:], expected, atol=1e-6, rtol=0), i
    # the couplings are separate per layer and start as MaPLe's code has them
    assert not torch.equal(maple.couplings[0].weight, maple.couplings[1].weight)
    fresh = build_method("maple", {"depth": 2}, make_backbone("test-vit-wide"), CLASSES, TEMPLATE)
    assert len(fresh.couplings) == 2 and fresh.couplings[1].weight.shape == (96, 80)


# --------------------------------------------------------------------- slots replaced per layer --
def test_deep_prompts_replace_the_slots_before_each_prompted_block():
    """IVLP with depth 2 on 3-block towers: before blocks 1 the slots hold exactly that layer's
    tokens in both towers; block 2 (beyond the depth) receives block 1's outputs there."""
    bb = make_backbone("test-vit-wide")
    torch.manual_seed(0)
    ivlp = build_method("ivlp", {"text_depth": 2, "vision_depth": 2}, bb, CLASSES, TEMPLATE).eval()
    vis_seen, vis_remove = _record_block_inputs(bb.model.visual.transformer.resblocks)
    txt_seen, txt_remove = _record_block_inputs(bb.text.transformer.resblocks)
    images = _images(bb, n=2)
    with torch.no_grad():
        ivlp(images)
    vis_remove(), txt_remove()
    v1 = ivlp.vision.tokens[1].expand(2, -1, -1)
    assert torch.equal(vis_seen[1][:, -2:], v1)
    assert not torch.allclose(vis_seen[2][:, -2:], v1, atol=1e-3)
    t1 = ivlp.text.deep[0].expand(len(CLASSES), -1, -1)
    assert torch.equal(txt_seen[1][:, 1:3], t1)
    assert not torch.allclose(txt_seen[2][:, 1:3], t1, atol=1e-3)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_layer_below_the_depth_and_none_above_changes_the_output(depth):
    """Deep VPT on a 3-block tower: a change to the layer-k tokens moves the logits iff k < depth
    (the method holds exactly ``depth`` layers, each of them used)."""
    bb = make_backbone("test-vit-wide")
    vpt = build_method("vpt", {"n_tokens": 3, "depth": depth}, bb, CLASSES, TEMPLATE).eval()
    assert len(vpt.vision.tokens) == depth
    images = _images(bb)
    with torch.no_grad():
        base = vpt(images)
        for k in range(depth):
            delta = torch.randn_like(vpt.vision.tokens[k])  # not a constant: LayerNorm removes those
            vpt.vision.tokens[k].add_(delta)
            assert (vpt(images) - base).abs().max() > 1e-4, k
            vpt.vision.tokens[k].sub_(delta)


def test_shallow_vpt_keeps_its_tokens_and_deep_vpt_replaces_them():
    bb = make_backbone("test-vit-wide")
    torch.manual_seed(0)
    shallow = build_method("vpt", {"n_tokens": 3, "depth": 1}, bb, CLASSES, TEMPLATE).eval()
    deep = build_method("vpt", {"n_tokens": 3, "depth": 3}, bb, CLASSES, TEMPLATE).eval()
    with torch.no_grad():
        deep.vision.tokens[0].copy_(shallow.vision.tokens[0])
    images = _images(bb)
    for method in (shallow, deep):
        seen, remove = _record_block_inputs(bb.model.visual.transformer.resblocks)
        with torch.no_grad():
            method(images)
        remove()
        slots = [seen[i][:, -3:] for i in range(3)]
        if method is deep:
            assert all(torch.equal(slots[i], deep.vision.tokens[i].expand(3, -1, -1)) for i in (1, 2))
        else:  # carried: each block's prompt outputs enter the next one
            assert not torch.allclose(slots[1], shallow.vision.tokens[0].expand(3, -1, -1), atol=1e-3)
    with torch.no_grad():
        assert (shallow(images) - deep(images)).abs().max() > 1e-4


# --------------------------------------------------------------------- PromptSRC ------------------
def test_promptsrc_regularisers_vanish_when_features_equal_the_frozen_ones(tiny_backbone):
    src = build_method("promptsrc", {"n_ctx_text": 4, "text_depth": 1, "vision_depth": 0,
                                     "teacher_templates": TEMPLATE}, tiny_backbone, CLASSES, TEMPLATE)
    src.train()
    images, labels = _images(tiny_backbone, n=4), torch.tensor([0, 1, 2, 3])
    out = src.output(images)
    logits = out.logits
    loss = src.loss(out, labels)
    parts = {k: float(v) for k, v in out.scalars.items()}
    assert parts["text_l1"] <= 1e-7 and parts["image_l1"] <= 1e-7 and abs(parts["logits_kl"]) <= 1e-6
    assert abs(loss.item() - F.cross_entropy(logits, labels).item()) <= 1e-5


def test_promptsrc_loss_is_the_reference_form(tiny_backbone):
    """CE + 25·L1(text) + 10·L1(image) + KL(zero-shot ‖ prompted) summed / (B·C), T = 1; frozen
    text = normalized mean of open_clip's unnormalized features over the teacher templates."""
    bb, teachers = tiny_backbone, ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    torch.manual_seed(0)
    src = build_method("promptsrc", {"teacher_templates": teachers}, bb, CLASSES, TEMPLATE).train()
    images, labels = _images(bb, n=4), torch.tensor([0, 1, 2, 5])
    out = src.output(images)
    loss = src.loss(out, labels)
    with torch.no_grad():
        text, image = src.text.features(), src.image_features(images)
        raw = torch.stack([bb.model.encode_text(bb.tokenize([t.format(c) for c in CLASSES])) for t in teachers])
        teacher = F.normalize(raw.mean(0), dim=-1)
        frozen = bb.model.encode_image(images, normalize=True)
        logits = bb.logit_scale * image @ text.t()
        zs = bb.logit_scale * frozen @ teacher.t()
        p_zs = zs.softmax(1)
        kl = (p_zs * (p_zs.log() - logits.log_softmax(1))).sum() / logits.numel()
        expected = (F.cross_entropy(logits, labels) + 25 * (text - teacher).abs().mean()
                    + 10 * (image - frozen).abs().mean() + kl)
    assert torch.allclose(src.teacher_text_features(), teacher, atol=1e-6)
    assert out.scalars["text_l1"] > 1e-4 and out.scalars["logits_kl"] > 0
    assert abs(loss.item() - expected.item()) <= 1e-5


def test_gpa_averages_epochs_with_gaussian_weights(tiny_backbone):
    src = build_method("promptsrc", {"gpa_mean": 2.5, "gpa_std": 1.0}, tiny_backbone, CLASSES, TEMPLATE)
    params = dict((n, p) for n, p in src.named_parameters() if p.requires_grad)
    epochs, snapshots = 4, []
    torch.manual_seed(0)
    for epoch in range(epochs):
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn_like(p))
        snapshots.append({n: p.detach().clone() for n, p in params.items()})
        src.on_train_epoch_end(epoch, epochs)
    src.on_fit_end()
    g = [math.exp(-0.5 * ((a - 2.5) / 1.0) ** 2) / math.sqrt(2 * math.pi) for a in range(1, epochs + 1)]
    w = [x / sum(g) for x in g]
    assert gpa_weights(epochs, 2.5, 1.0) == pytest.approx(w)
    for n, p in params.items():
        expected = sum(w[e] * snapshots[e][n] for e in range(epochs))
        assert torch.allclose(p, expected, atol=1e-6), n
    assert not torch.allclose(params["text.context.ctx"], snapshots[-1]["text.context.ctx"])


def test_gpa_off_keeps_the_last_epoch(tiny_backbone):
    src = build_method("promptsrc", {"gpa": False}, tiny_backbone, CLASSES, TEMPLATE)
    before = {k: v.clone() for k, v in src.trainable_state().items()}
    src.on_train_epoch_end(0, 2), src.on_fit_end()
    assert all(torch.equal(v, before[k]) for k, v in src.trainable_state().items())


# --------------------------------------------------------------------- recipes ------------------
REFERENCE = {  # (method fields, lr, epochs) of the original configs, ViT-B/16, batch 4
    ("vpt", "fewshot"): ({"n_tokens": 8, "depth": 12}, 0.0025, 5),
    ("ivlp", "fewshot"): ({"n_ctx_text": 2, "n_ctx_vision": 2, "text_depth": 9, "vision_depth": 9}, 0.0035, 5),
    ("maple", "fewshot"): ({"n_ctx": 2, "depth": 9, "ctx_init": "a photo of a"}, 0.0035, 5),
    ("promptsrc", "fewshot"): ({"n_ctx_text": 4, "n_ctx_vision": 4, "text_depth": 9, "vision_depth": 9,
                                "gpa_mean": 30, "gpa_std": 30}, 0.0025, 50),
    ("promptsrc", "base2novel"): ({"text_loss_weight": 25, "image_loss_weight": 10, "gpa_mean": 15,
                                   "gpa_std": 1}, 0.0025, 20),
}


@pytest.mark.parametrize("name", DEEP)
@pytest.mark.parametrize("setting", ["fewshot", "base2novel"])
def test_recipes_hold_the_reference_settings(name, setting):
    recipe = load_recipe(RECIPES / name / f"{setting}.yaml")
    fields, lr, epochs = REFERENCE.get((name, setting), REFERENCE[(name, "fewshot")])
    assert (recipe.backbone.name, recipe.backbone.pretrained) == ("ViT-B-16", "openai")
    assert {k: recipe.method[k] for k in fields} == fields
    assert (recipe.optim.name, recipe.optim.lr, recipe.data.batch_size, recipe.trainer.max_epochs) == \
        ("sgd", lr, 4, epochs)
    assert (recipe.optim.warmup_epochs, recipe.optim.warmup_lr) == (1, 1e-5)
    assert recipe.data.setting == ("base2novel" if setting == "base2novel" else "all")
    if name == "promptsrc":
        assert len(recipe.method.teacher_templates) == 60


# --------------------------------------------------------------------- training end to end -------
def _train_loss(exp: Experiment) -> float:
    exp.method.eval()
    loader = exp.data.dataloader(exp.data.train_items, exp.data.test_transform(), 64)
    with torch.no_grad():
        losses = [F.cross_entropy(exp.method(x), y, reduction="sum") for x, y in loader]
    return float(sum(losses)) / len(exp.data.train_items)


@pytest.mark.parametrize("name", DEEP)
def test_short_fit_lowers_the_loss(name, image_folder, tmp_path):
    recipe = load_recipe(RECIPES / name / "fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, method=name, **{"optim.lr": 0.05, "optim.warmup_epochs": 0,
                                               "trainer.max_epochs": 3}))
    exp = Experiment(recipe)
    frozen = {k: v.clone() for k, v in exp.backbone.state_dict().items()}
    before = _train_loss(exp)
    exp.fit()
    after = _train_loss(exp)
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(v, frozen[k]) for k, v in exp.backbone.state_dict().items())
    if name == "promptsrc":  # the engine ran GPA over every epoch and loaded the average
        assert float(exp.method.gpa.total_weight) == pytest.approx(1.0)


@pytest.mark.parametrize("name", DEEP)
def test_base_to_novel_run(name, image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, method=name, **{"trainer.max_epochs": 1, "run_name": "b2n"})
    results = run_fit(load_recipe(RECIPES / name / "base2novel.yaml", over))
    m = results["metrics"]
    assert set(m) == {"base_acc", "novel_acc", "hm"} and results["classes"] == {"base": 3, "novel": 3}
    assert all(0 <= v <= 100 for v in m.values())
    assert results["trainable_params"] > 0
    assert (tmp_path / "b2n" / "adapter" / "adapter.safetensors").is_file()
