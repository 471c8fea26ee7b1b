"""CoOp's defining behaviours."""
from __future__ import annotations

import math

import pytest
import torch

from adapt.engine_optim import epoch_lr_factor
from adapt.export import AdapterError, load_adapter, save_adapter
from adapt.methods import build_method
from tests.conftest import CLASSES

TEMPLATE = ["a photo of a {}."]


def test_init_from_a_photo_of_a_gives_the_zero_shot_logits(tiny_backbone):
    images = torch.randn(5, 3, 32, 32)
    zs = build_method("zeroshot", None, tiny_backbone, CLASSES, TEMPLATE).eval()
    coop = build_method("coop", {"ctx_init": "a photo of a"}, tiny_backbone, CLASSES, TEMPLATE).eval()
    assert coop.prompts.n_ctx == 4
    with torch.no_grad():
        assert (coop(images) - zs(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_token_positions_place_the_name(tiny_backbone, position):
    """Front/middle prompts hold the same tokens as the hand-written sentence they describe."""
    coop = build_method("coop", {"ctx_init": "a photo of a", "class_token_position": position},
                        tiny_backbone, ["red panda", "dog"], TEMPLATE)
    if position == "front":
        text = ["red panda a photo of a.", "dog a photo of a."]
    else:
        text = ["a photo red panda of a.", "a photo dog of a."]
    ref = tiny_backbone.embed_tokens(tiny_backbone.tokenize(text))
    got = coop.prompts.embeddings()
    assert torch.equal(got, ref[:, :got.shape[1]])


def test_repointing_to_novel_names_equals_building_for_them(tiny_backbone):
    torch.manual_seed(1)
    base = build_method("coop", {"n_ctx": 4}, tiny_backbone, CLASSES[:3], TEMPLATE)
    novel = build_method("coop", {"n_ctx": 4}, tiny_backbone, CLASSES[3:], TEMPLATE)
    novel.load_trainable_state(base.trainable_state())
    base.set_classnames(CLASSES[3:])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(base.eval()(images), novel.eval()(images), atol=1e-6)


def test_class_specific_context_refuses_other_classes(tiny_backbone, tmp_path):
    csc = build_method("coop", {"n_ctx": 2, "csc": True}, tiny_backbone, CLASSES[:3], TEMPLATE)
    assert csc.prompts.ctx.shape == (3, 2, tiny_backbone.text_width)
    save_adapter(csc, tmp_path)
    with pytest.raises(AdapterError, match="cannot classify other class"):
        load_adapter(tmp_path, backbone=tiny_backbone, classnames=CLASSES[3:])


def test_random_init_is_normal_002(tiny_backbone):
    torch.manual_seed(0)
    coop = build_method("coop", {"n_ctx": 16}, tiny_backbone, CLASSES, TEMPLATE)
    std = coop.prompts.ctx.std().item()
    assert coop.prompts.ctx.shape == (16, tiny_backbone.text_width) and abs(std - 0.02) < 0.003


def test_warmup_then_cosine_schedule_as_coop():
    f = epoch_lr_factor("cosine", warmup_epochs=1, warmup_factor=1e-5 / 2e-3, max_epochs=10)
    assert f(0) == pytest.approx(0.005)
    assert f(1) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert 0 < f(9) < 0.1


def test_adapter_refuses_another_backbone(tiny_backbone, tmp_path):
    from tests.conftest import make_backbone

    coop = build_method("coop", {"n_ctx": 2}, tiny_backbone, CLASSES, TEMPLATE)
    save_adapter(coop, tmp_path)
    with pytest.raises(AdapterError, match="exported for backbone"):
        load_adapter(tmp_path, backbone=make_backbone("test-vit-wide"))
