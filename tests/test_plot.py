"""PLOT++: Sinkhorn as the original runs it, the optimal-transport logits by hand, the neutral
setting (one view, one prompt: VPT-shallow with a CoOp prompt), the two stages, and learning on
the offline world."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import load_recipe
from adapt.export import save_adapter
from adapt.methods import build_method
from adapt.methods.plot import sinkhorn
from adapt.methods.registry import method_config
from adapt.run import run_fit
from tests.conftest import CLASSES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def plot(backbone, names=CLASSES[:3], **over):
    return build_method("plot", method_config("plot", over), backbone, list(names), ["a photo of a {}."])


def test_sinkhorn_meets_both_marginals_and_stops_on_the_batch_mean():
    torch.manual_seed(0)
    sim = torch.rand(5, 4, 3) * 2 - 1
    K = torch.exp(-(1 - sim) / 0.1)
    T = sinkhorn(K, max_iter=1000, tol=1e-9)
    assert torch.allclose(T.sum(-1), torch.full((5, 4), 1 / 4), atol=1e-5)  # rows: 1/M
    assert torch.allclose(T.sum(-2), torch.full((5, 3), 1 / 3), atol=1e-6)  # columns: 1/N (last step)
    # the original's loop, by hand: from ones, r then c, T = r K c; one iteration with tol 0
    r = (1 / 4) / (K @ torch.ones(5, 3, 1)).squeeze(-1)
    c = (1 / 3) / (K.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sinkhorn(K, max_iter=1, tol=0.0), r[..., None] * K * c[:, None], atol=1e-7)
    # equal costs: the uniform plan
    assert torch.allclose(sinkhorn(torch.ones(2, 4, 3)), torch.full((2, 4, 3), 1 / 12))
    # a tolerance every first step meets stops after one iteration, whatever max_iter allows
    assert torch.equal(sinkhorn(K, max_iter=100, tol=1e9), sinkhorn(K, max_iter=1, tol=0.0))


def test_logits_are_the_transport_weighted_cosines_by_hand(tiny_backbone):
    torch.manual_seed(0)
    method = plot(tiny_backbone, n_visual=3, ctx_inits=["a photo of a", "one picture of a"]).eval()
    with torch.no_grad():
        method.visual.normal_(std=0.5)
        images = torch.randn(2, 3, 32, 32)
        # each view is its own pass with its own prompt tokens
        views = torch.stack([tiny_backbone.encode_image(images, prompts=method.visual[m], normalize=False)
                             for m in range(3)])
        assert torch.allclose(method.image_features(images), views, atol=1e-5)
        texts = torch.stack([p.text_features() for p in method.prompts])  # normalized [N, C, d]
        sim = torch.einsum("mbd,ncd->bcmn", F.normalize(views, dim=-1), texts)
        plan = sinkhorn(torch.exp(-(1 - sim) / 0.1).reshape(6, 3, 2)).view(2, 3, 3, 2)
        hand = tiny_backbone.logit_scale * (plan * sim).sum((-2, -1))
        logits = method.predict(images)
    assert torch.allclose(logits, hand, rtol=1e-4, atol=1e-3)
    assert not method.config.uses_trade_off  # the default stage (joint): OT logits only


def test_one_view_and_one_prompt_is_vpt_shallow_with_a_coop_prompt(tiny_backbone):
    """With M = N = 1 the plan is 1: the logits are CLIP's of the one prompted view against the
    one prompt, i.e. VPT-shallow's with the hand-written prompt "a photo of a <class>."; the
    trade-off adds the same term again."""
    method = plot(tiny_backbone, n_visual=1, n_visual_tokens=2, ctx_inits=["a photo of a"]).eval()
    vpt = build_method("vpt", method_config("vpt", {"depth": 1, "n_tokens": 2}), tiny_backbone,
                       CLASSES[:3], ["a photo of a {}."]).eval()
    with torch.no_grad():
        method.visual.normal_(std=0.3)
        vpt.vision.tokens[0].copy_(method.visual[0])
        images = torch.randn(2, 3, 32, 32)
        ref = vpt.predict(images)
        assert torch.allclose(method.predict(images), ref, rtol=1e-4, atol=1e-2)
        both = plot(tiny_backbone, n_visual=1, ctx_inits=["a photo of a"], trade_off=True).eval()
        both.visual.copy_(method.visual)
        assert torch.allclose(both.predict(images), 2 * ref, rtol=1e-4, atol=1e-2)
    assert (ref.std() > 0).item()


def test_stages_train_what_the_original_trains_and_chain(tiny_backbone, tmp_path):
    vision = plot(tiny_backbone, stage="vision")
    assert [n for n, p in vision.named_parameters() if p.requires_grad] == ["visual"]
    assert vision.config.uses_trade_off
    with torch.no_grad():
        vision.visual.normal_(std=0.1)
    adapter = save_adapter(vision, tmp_path / "stage1")
    joint = plot(tiny_backbone, init_from=str(adapter))
    assert {n for n, p in joint.named_parameters() if p.requires_grad} == {
        "visual", "prompts.0.ctx", "prompts.1.ctx", "prompts.2.ctx", "prompts.3.ctx"}
    assert torch.equal(joint.visual, vision.visual)  # started from stage 1
    coop = build_method("coop", None, tiny_backbone, CLASSES[:3], ["a photo of a {}."])
    other = save_adapter(coop, tmp_path / "coop")
    with pytest.raises(ValueError, match="is a coop adapter; the joint stage starts from a plot adapter"):
        plot(tiny_backbone, init_from=str(other))
    with pytest.raises(ValueError, match="set method.stage=joint"):
        method_config("plot", {"stage": "vision", "init_from": str(adapter)})
    with pytest.raises(ValueError, match="does not fit this plot"):
        plot(tiny_backbone, init_from=str(adapter), n_visual=2)


def test_the_vision_stage_learns_the_world(tmp_path):
    """Five epochs of stage 1 on world_colour (16 shots) with the shipped tiny CLIP lift test
    accuracy far above zero-shot's (PLOT's prompts start near it)."""
    over = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
            "data.root=null", "data.num_workers=0", "trainer.progress_bar=false", "logger.csv=false",
            f"output_dir={tmp_path}", "trainer.max_epochs=5", "run_name=v"]
    res = run_fit(load_recipe(RECIPES / "plot" / "vision.yaml", over + ["baseline=true"]))
    assert res["metrics"]["test_acc"] > res["zeroshot_metrics"]["test_acc"] + 10.0
