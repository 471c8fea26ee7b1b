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
    with pytest.raises(ValueError, match="method.prompts='upt' is not one of coop, vpt"):
        build_method("mvlpt", {"prompts": "upt"}, tiny_backbone, NAMES, ["{}"])
