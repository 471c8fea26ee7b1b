"""VT-CLIP: zero-shot CLIP at ratio 0 and at its start (W_o = 0), the cross-attention formula by
hand, chunked evaluation equal to the whole, re-pointing to new classes, bad settings refused,
and the loss falling on the offline world."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import RecipeError, load_recipe
from adapt.methods import build_method
from adapt.methods.registry import method_config
from tests.conftest import CLASSES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NAMES = CLASSES[:4]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def vtclip(backbone, names=NAMES, **over):
    return build_method("vtclip", method_config("vtclip", over), backbone, list(names), TEMPLATES)


def _images(n=5):
    torch.manual_seed(3)
    return torch.randn(n, 3, 32, 32)


def _randomize(method, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in method.attention.parameters():
            p.normal_(0, 0.3)


def test_ratio_zero_and_the_untrained_module_give_the_zero_shot_logits(tiny_backbone):
    zs = build_method("zeroshot", None, tiny_backbone, NAMES, TEMPLATES)
    with torch.no_grad():
        ref = zs(_images())
        start = vtclip(tiny_backbone)                 # W_o = 0: training starts at zero-shot
        off = vtclip(tiny_backbone, ratio=0.0)        # any weights, ratio 0
        _randomize(off)
        moved = vtclip(tiny_backbone, init="random")  # and the module does move the logits
        assert (start(_images()) - ref).abs().max() <= 1e-5
        assert (off(_images()) - ref).abs().max() <= 1e-5
        assert (moved(_images()) - ref).abs().max() > 1e-2


def test_logits_follow_the_cross_attention_formula_by_hand(tiny_backbone):
    """Per image, per head, per class: softmax over the patches of (t W_q + b_q)·(F W_k + b_k) / √d_h,
    times F W_v + b_v, heads concatenated, W_o; t' = t + α o, logit = s cos(f, t')."""
    m = vtclip(tiny_backbone, ratio=0.7, heads=2)
    _randomize(m)
    images = _images(3)
    with torch.no_grad():
        dense = tiny_backbone.encode_image_dense(images, outputs=("pooled", "tokens"))
        a = m.attention[0]
        text, d = m.text_features, m.text_features.shape[1]
        dh = d // 2
        ref = torch.zeros(len(images), len(NAMES))
        for b in range(len(images)):
            fs = dense.tokens[b]
            q, k, v = text @ a.q.weight.t() + a.q.bias, fs @ a.k.weight.t() + a.k.bias, fs @ a.v.weight.t() + a.v.bias
            for c in range(len(NAMES)):
                heads = []
                for h in range(2):
                    sl = slice(h * dh, (h + 1) * dh)
                    w = torch.softmax(torch.stack([q[c, sl] @ k[j, sl] for j in range(len(fs))]) / math.sqrt(dh), 0)
                    heads.append((w[:, None] * v[:, sl]).sum(0))
                o = torch.cat(heads) @ a.out.weight.t() + a.out.bias
                t = text[c] + 0.7 * o
                ref[b, c] = tiny_backbone.logit_scale * dense.pooled[b] @ (t / t.norm())
        got = m(images)
    assert (got - ref).abs().max() <= 1e-4
    assert (got - tiny_backbone.logit_scale * dense.pooled @ text.t()).abs().max() > 1e-2


def test_chunked_evaluation_and_repointing_equal_the_whole(tiny_backbone):
    """Without gradients the classes go ``class_chunk`` at a time: the same logits; re-pointed at
    other names each column is that name's alone (the attention is class-agnostic)."""
    whole = vtclip(tiny_backbone, names=CLASSES, class_chunk=100)
    chunked = vtclip(tiny_backbone, names=CLASSES, class_chunk=4)
    _randomize(whole)
    chunked.load_trainable_state(whole.trainable_state())
    assert not whole.couples_classes and whole.repointable
    with torch.no_grad():
        ref = whole(_images())
        assert (chunked(_images()) - ref).abs().max() <= 1e-5
        whole.set_classnames(CLASSES[4:] + CLASSES[:2])
        again = whole(_images())
    assert (again - ref[:, [4, 5, 0, 1]]).abs().max() <= 1e-5


def test_bad_settings_are_refused_with_one_message(tiny_backbone):
    with pytest.raises(ValueError, match=r"vtclip: ratio=-0.1 must be a finite number >= 0.*; layers=0 must be"):
        method_config("vtclip", {"ratio": -0.1, "layers": 0})
    with pytest.raises(ValueError, match="init='zero' must be 'xavier'"):
        method_config("vtclip", {"init": "zero"})
    with pytest.raises(ValueError, match="heads=3 does not divide the feature width"):
        vtclip(tiny_backbone, heads=3)
    with pytest.raises(RecipeError, match="ratio"):
        load_recipe(RECIPES / "vtclip" / "world.yaml", ["method.ratio=-1"])


def test_training_steps_on_the_world_lower_the_loss():
    """A few SGD steps of the world recipe's optimiser on cached world features lower the
    cross-entropy of those images (the module starts at zero-shot CLIP)."""
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.datamodule import AdaptDataModule
    from adapt.data import DataConfig

    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name="tiny-vit-p4", pretrained="world"))
    dm = AdaptDataModule(DataConfig(dataset="world_colour", shots=4, num_workers=0), bb.image_size,
                         bb.image_mean, bb.image_std, seed=1)
    dm.setup()
    m = build_method("vtclip", None, bb, dm.train_classnames, dm.templates)
    cached = dm.encode(bb, dm.train_items, dm.test_transform(), "train", normalize=False, dense=m.dense_inputs)
    x, y = cached.features[0].float(), cached.labels
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
