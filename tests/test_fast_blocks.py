"""The wrapper's fast block path (fused q/k/v, scaled_dot_product_attention, cache-sized image
chunks) computes what open_clip's own blocks compute: features, prompt-hooked logits and the
text tower's gradients; ``fast_blocks: false`` turns it off. Exactness only, never time."""
from __future__ import annotations

import pytest
import torch

import adapt.backbone as backbone_module
from adapt.methods import build_method
from tests.conftest import CLASSES, make_backbone

TEMPLATE = ["a photo of a {}."]
PROMPTS = ["a photo of a dog.", "x", "a small red striped star on a grey background, drawn", "cat"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _count_fused(monkeypatch, names=("fused_block", "fused_block_head")) -> list:
    calls = []
    for name in names:
        real = getattr(backbone_module, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(backbone_module, name, spy)
    return calls


@pytest.mark.parametrize("name", ["adapt-tiny-vit", "test-vit-wide"])
def test_fast_path_equals_open_clip_on_tiny_models(name, monkeypatch):
    bb = make_backbone(name, image_chunk_size=2)  # 5 images: chunks of 2, 2, 1
    calls = _count_fused(monkeypatch)
    images = torch.randn(5, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(PROMPTS)
    with torch.no_grad():
        img, txt = bb.encode_image(images), bb.encode_text(tokens)
        ref_img = bb.model.encode_image(images, normalize=True)
        ref_txt = bb.model.encode_text(tokens, normalize=True)
    assert len(calls) == 3 * bb.vision_depth + bb.text_depth  # every block went the fast way
    # each chunk's last image block gives only the class token, where that is what is pooled
    assert calls.count("fused_block_head") == (3 if bb.model.visual.pool_type == "tok" else 0)
    assert _rel(img, ref_img) <= 1e-4 and _rel(txt, ref_txt) <= 1e-4


def test_last_block_head_is_the_full_blocks_class_row():
    bb = make_backbone("test-vit-wide")
    block = bb.model.visual.transformer.resblocks[-1]
    torch.manual_seed(0)
    x = torch.randn(3, 17, bb.vision_width)
    with torch.no_grad():
        full = backbone_module.fused_block(block, x)
        head = backbone_module.fused_block_head(block, x, 2)
    assert head.shape == (3, 2, bb.vision_width)
    assert (head - full[:, :2]).abs().max() <= 1e-5 and (full[:, :2] - x[:, :2]).abs().max() > 0.1


def test_average_pooled_tower_keeps_every_token_of_its_last_block(monkeypatch):
    bb = make_backbone("adapt-tiny-vit")
    assert bb.model.visual.pool_type == "tok"
    bb.model.visual.pool_type = "avg"  # its pooled feature now reads every patch token
    calls = _count_fused(monkeypatch)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        fast = bb.encode_image(images)
        ref = bb.model.encode_image(images, normalize=True)
    assert "fused_block_head" not in calls and _rel(fast, ref) <= 1e-4


def test_fast_path_equals_open_clip_on_vit_b16_architecture():
    torch.manual_seed(0)
    bb = backbone_module.build_backbone(backbone_module.BackboneConfig(name="ViT-B-16", pretrained=None))
    assert bb._fast_vit()
    images = torch.randn(2, 3, 224, 224)
    tokens = bb.tokenize(PROMPTS)
    with torch.no_grad():
        assert _rel(bb.encode_image(images), bb.model.encode_image(images, normalize=True)) <= 1e-4
        assert _rel(bb.encode_text(tokens), bb.model.encode_text(tokens, normalize=True)) <= 1e-4


def test_option_turns_the_fast_path_off(monkeypatch):
    bb = make_backbone(fast_blocks=False)
    calls = _count_fused(monkeypatch)
    seen = []
    hook = bb.model.visual.transformer.resblocks[0].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        bb.encode_image(torch.randn(9, 3, bb.image_size, bb.image_size))
        bb.encode_text(bb.tokenize(PROMPTS))
    hook.remove()
    assert calls == [] and seen == [1]  # open_clip's own forward, the 9 images in one pass
    assert bb._image_chunk(torch.zeros(9, 1), False, None, None) == 0
    assert not make_backbone(fast_blocks=False)._fast_vit()


def test_hooked_blocks_run_open_clips_forward(tiny_backbone, monkeypatch):
    calls = _count_fused(monkeypatch)
    seen = []
    block = tiny_backbone.model.visual.transformer.resblocks[0]
    hook = block.register_forward_pre_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        tiny_backbone.encode_image(torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size))
    hook.remove()
    assert seen == [1] and calls == []  # a hooked tower never skips its hooks


@pytest.mark.parametrize("model", ["test-vit-wide", "adapt-tiny-vit"])  # average / class-token pooled
@pytest.mark.parametrize("name,cfg", [
    ("vpt", None), ("ivlp", None), ("maple", None), ("promptsrc", None), ("vp", None), ("cocoop", None)])
def test_prompt_hooks_give_the_same_logits_fast_and_eager(name, cfg, model):
    bb = make_backbone(model, image_chunk_size=2)
    torch.manual_seed(0)
    method = build_method(name, cfg, bb, CLASSES, TEMPLATE).eval()
    with torch.no_grad():  # prompts away from their init, so every slot matters
        for p in method.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = torch.randn(5, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        fast = method(images)
        bb.config.fast_blocks, bb.config.image_chunk_size = False, 0
        eager = method(images)
    assert _rel(fast, eager) <= 1e-5 and (fast - eager).abs().max() <= 1e-4


def test_text_gradients_unchanged_on_the_fast_path():
    bb = make_backbone("test-vit-wide")
    torch.manual_seed(0)
    coop = build_method("coop", {"n_ctx": 4}, bb, CLASSES, TEMPLATE).train()
    feats = torch.nn.functional.normalize(torch.randn(3, bb.embed_dim), dim=-1)
    y = torch.tensor([0, 2, 5])
    grads = []
    for fast in (True, False):
        bb.config.fast_blocks = fast
        coop.zero_grad()
        torch.nn.functional.cross_entropy(coop.forward_features(feats), y).backward()
        grads.append(coop.prompts.ctx.grad.clone())
    assert _rel(grads[0], grads[1]) <= 1e-5


@pytest.mark.parametrize("model", ["test-vit-wide", "adapt-tiny-vit"])
def test_deep_prompt_training_gradients_unchanged_on_the_fast_path(model):
    bb = make_backbone(model)
    torch.manual_seed(0)
    maple = build_method("maple", None, bb, CLASSES, TEMPLATE).train()
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    grads = []
    for fast in (True, False):
        bb.config.fast_blocks = fast
        maple.zero_grad()
        torch.nn.functional.cross_entropy(maple(images), torch.tensor([1, 4])).backward()
        grads.append(torch.cat([p.grad.flatten() for p in maple.trainable_parameters()]))
    assert _rel(grads[0], grads[1]) <= 1e-5
