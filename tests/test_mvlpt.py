"""MVLPT: MCoOp is CoOp with the class name in the middle; MVPT is deep VPT with its own init and
the frozen "a photo of a <class>." text. The two stages: tests/test_multi_task.py (warm_start)."""
from __future__ import annotations

import pytest
import torch

from adapt.methods import build_method
from adapt.methods.mvlpt import xavier_bound

NAMES = ["red", "green", "blue"]


def test_mcoop_is_coop_with_the_class_name_in_the_middle(tiny_backbone):
    torch.manual_seed(0)
    ours = build_method("mvlpt", {"n_ctx": 4}, tiny_backbone, NAMES, ["a drawing of a {}."])
    coop = build_method("coop", {"n_ctx": 4, "class_token_position": "middle"}, tiny_backbone, NAMES, ["x {}"])
    with torch.no_grad():
        coop.prompts.ctx.copy_(ours.prompts.ctx)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), coop(x))
    end = build_method("coop", {"n_ctx": 4}, tiny_backbone, NAMES, ["x {}"])
    with torch.no_grad():
        end.prompts.ctx.copy_(ours.prompts.ctx)
    assert not torch.allclose(ours(x), end(x))  # the position is MVLPT's, not CoOp's default


def test_mvpt_is_deep_vpt_on_every_block_reading_a_photo_of_a(tiny_backbone):
    torch.manual_seed(0)
    ours = build_method("mvlpt", {"prompts": "vpt", "n_ctx": 3}, tiny_backbone, NAMES, ["a drawing of a {}."])
    bound = xavier_bound(tiny_backbone, tiny_backbone.vision_width)
    tokens = torch.stack(list(ours.vision.tokens))
    assert tokens.shape == (tiny_backbone.vision_depth, 3, tiny_backbone.vision_width)
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.9 * bound  # uniform(-b, b)
    vpt = build_method("vpt", {"n_tokens": 3, "depth": tiny_backbone.vision_depth}, tiny_backbone, NAMES,
                       ["a photo of a {}."])
    with torch.no_grad():
        for mine, theirs in zip(ours.vision.tokens, vpt.vision.tokens):
            theirs.copy_(mine)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), vpt(x))  # whatever the dataset's own template


def test_an_unknown_prompt_family_is_refused_with_the_known_ones(tiny_backbone):
    with pytest.raises(ValueError, match="method.prompts='mupt' is not one of coop, vpt, upt"):
        build_method("mvlpt", {"prompts": "mupt"}, tiny_backbone, NAMES, ["{}"])


def _by_hand(coupled, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's residual block on one token alone: attention over itself is its value, projected."""
    b = coupled.block
    w_v, b_v = b.attn.in_proj_weight.chunk(3)[2], b.attn.in_proj_bias.chunk(3)[2]
    x = tokens + b.attn.out_proj(b.ln_1(tokens) @ w_v.T + b_v)
    h = b.mlp.c_fc(b.ln_2(x))
    return x + b.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


def test_mupt_couples_both_towers_prompts_through_one_block_each_token_on_its_own(tiny_backbone):
    torch.manual_seed(0)
    ours = build_method("mvlpt", {"prompts": "upt", "n_ctx": 3, "project_dim": 8}, tiny_backbone, NAMES, ["{}"])
    c = ours.coupled
    depth, width = tiny_backbone.vision_depth, tiny_backbone.vision_width
    ctx, layers = c()
    text = c.text_out(_by_hand(c, c.text_in(c.ctx)))
    vision = c.vision_out(_by_hand(c, c.vision_in(c.vision_tokens.reshape(-1, width)))).reshape(depth, 3, width)
    torch.testing.assert_close(ctx, text)
    torch.testing.assert_close(torch.stack(layers), vision)
    # the logits: MCoOp's text (class in the middle) from the generated context, MVPT's images
    mcoop = build_method("mvlpt", {"n_ctx": 3}, tiny_backbone, NAMES, ["{}"])
    mvpt = build_method("mvlpt", {"prompts": "vpt", "n_ctx": 3}, tiny_backbone, NAMES, ["{}"])
    with torch.no_grad():
        mcoop.prompts.ctx.copy_(ctx)
        for mine, theirs in zip(layers, mvpt.vision.tokens):
            theirs.copy_(mine)
    x = torch.randn(2, 3, 32, 32)
    from adapt.methods.deep_prompts import encode_prompted_images
    expected = tiny_backbone.logits(encode_prompted_images(tiny_backbone, x, list(mvpt.vision.tokens)),
                                    mcoop.text_features())
    torch.testing.assert_close(ours(x), expected)
    ours(x).logsumexp(-1).sum().backward()  # every part learns
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
