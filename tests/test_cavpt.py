"""CAVPT (DPT): the class-aware prompt of the last block equals a hand computation of the code's
formula on the tokens entering it, with the zero-shot top-K classes; the loss follows the
code's epoch schedule and counts only the layer logits of slots holding the label; the context
trains at its own lr and warm-up; bad options are refused; and, with a checkout of fanrena/DPT
named by ``ADAPT_CAVPT_REPO``, logits and the gradients of the original's own loss equal adapt's."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import make_backbone

NAMES = ["red", "green", "blue", "cyan", "magenta"]


def _method(backbone, names=NAMES, **config):
    torch.manual_seed(0)
    method = build_method("cavpt", config or None, backbone, names, ["a photo of a {}."]).eval()
    with torch.no_grad():  # away from the init (LayerNorms at 1 / 0), the same per seed
        for p in method.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return method


def _hand_forward(method, images):
    """The code's CustomCLIP_Selected_CoVPTDeep.forward written out on a two-block tower with
    bottom_limit 2: VPT tokens at block 0 (after ln_pre), the class-aware prompt at block 1."""
    bb, ext = method.backbone, method.extractor
    v = bb.model.visual
    f0 = bb.encode_image(images)
    t0 = F.normalize(torch.stack([bb.encode_text(bb.tokenize([f"a photo of a {n}."]))[0] for n in method.classnames]),
                     dim=-1)
    top = torch.sort(f0 @ t0.t(), dim=-1, descending=True).indices[:, :method.config.cpn]
    t = method.prompts.text_features(normalize=False)
    x, n, _ = bb._vit_embed(images)
    x = torch.cat([x, method.vpt[0].expand(len(images), -1, -1)], 1)
    x = bb._run_block(v.transformer.resblocks[0], x, None, v.transformer)[:, :n]
    q = t[top] @ ext.meta_nets[0].weight.t() + ext.meta_nets[0].bias
    kv = torch.cat([x, ext.ctx[0].expand(len(images), -1, -1)], 1)
    attn = torch.softmax((q @ ext.q[0].weight.t()) @ (kv @ ext.k[0].weight.t()).transpose(1, 2) / math.sqrt(32), -1)
    a = (attn @ kv) @ ext.v[0].weight.t()
    w = a.shape[-1]
    prompt = F.layer_norm(a + q, (w,), ext.lns2[0].weight, ext.lns2[0].bias)
    layer = F.layer_norm(a, (w,), ext.lns[0].weight, ext.lns[0].bias) @ ext.classifiers[0].weight.t()
    x = bb._run_block(v.transformer.resblocks[1], torch.cat([x, prompt], 1), None, v.transformer)[:, :n]
    f = F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)
    s, tn = bb.logit_scale, F.normalize(t, dim=-1)
    return {"logits": s * f @ tn.t(), "zs_image": s * f0 @ tn.t(), "zs_text": s * f @ t0.t(), "layer": layer,
            "top": top}


def test_outputs_equal_a_hand_computation_of_the_formula():
    bb = make_backbone("test-vit-openai-77")  # two blocks, CLS pooling
    method = _method(bb, bottom_limit=2, cpn=3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, hand = method.output(images), _hand_forward(method, images)
    assert torch.equal(out.tensors["top_k"], hand["top"])
    for ours, theirs in ((out.logits, hand["logits"]), (out.tensors["zs_image_logits"], hand["zs_image"]),
                         (out.tensors["zs_text_logits"], hand["zs_text"]), (out.tensors["layer_logits"][:, 0], hand["layer"])):
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # the prompts depend on which classes the image's zero-shot top-K holds
    with torch.no_grad():
        assert not torch.allclose(method(images), _method(bb, bottom_limit=2, cpn=2)(images), atol=1e-3)


def test_loss_follows_the_guidance_schedule_and_counts_only_slots_holding_the_label(tiny_backbone):
    method = _method(tiny_backbone, cpn=2).train()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = method.output(images)
    top = out.tensors["top_k"]
    labels = torch.where(torch.arange(6) % 2 == 0, top[:, 1], (top[:, 0] + 1) % 5)  # hits and maybe misses
    hit = top == labels[:, None]
    ce = lambda z: F.cross_entropy(z, labels)  # noqa: E731
    layer = out.tensors["layer_logits"]  # [B, 1, K, C]
    layer_ce = F.cross_entropy(layer[:, 0][hit], labels[:, None].expand_as(hit)[hit])
    method.on_train_epoch_start(29, 60)
    guided = method.loss(out, labels)
    expected = ce(out.tensors["zs_image_logits"]) + ce(out.tensors["zs_text_logits"]) + 0.1 * ce(out.logits)
    assert torch.allclose(guided, expected + 0.3 * layer_ce, atol=1e-5)
    method.on_train_epoch_start(30, 60)
    assert torch.allclose(method.loss(out, labels), ce(out.logits) + 0.3 * layer_ce, atol=1e-5)
    miss = torch.tensor([next(c for c in range(5) if c not in top[0])])  # no slot holds it: CE alone
    one = method.output(images[:1])
    assert torch.allclose(method.loss(one, miss), F.cross_entropy(one.logits, miss))


def test_the_context_trains_at_its_own_rate_and_warm_up():
    from omegaconf import OmegaConf

    from adapt.engine_optim import epoch_lr_factor, optimizer_groups

    method = _method(make_backbone())
    cfg = OmegaConf.create({"lr": 0.01, "weight_decay": 5e-4, "warmup_epochs": 10, "interval": "epoch"})
    groups = {g["name"]: g for g in optimizer_groups(method, cfg)}
    assert set(groups) == {"context", "cavpt", "vpt"}
    assert groups["context"]["lr"] == pytest.approx(0.002) and groups["context"]["warmup_epochs"] == 1
    assert groups["vpt"]["lr"] == groups["cavpt"]["lr"] == 0.01 and groups["vpt"]["warmup_epochs"] == 10
    factor = epoch_lr_factor("cosine", 1, 1e-3, 60)
    assert factor(0) == 1e-3 and factor(1) == 1.0 and epoch_lr_factor("cosine", 10, 1e-3, 60)(5) == 1e-3
    over = OmegaConf.create({**cfg, "groups": {"context": {"warmup_epochs": 3}}})
    assert {g["name"]: g for g in optimizer_groups(method, over)}["context"]["warmup_epochs"] == 3
    with pytest.raises(ValueError, match="warms up for 1 epochs of its own, but optim.interval=step"):
        optimizer_groups(method, OmegaConf.create({**cfg, "interval": "step"}))


@pytest.mark.parametrize("config,message", [
    ({"cpn": 0}, "method.cpn must be >= 1"),
    ({"bottom_limit": 0}, "method.bottom_limit must be >= 1"),
    ({"alpha": -1.0}, "method.alpha must be >= 0"),
])
def test_bad_options_are_refused_in_one_message(config, message, tiny_backbone):
    with pytest.raises(ValueError, match=message):
        build_method("cavpt", config, tiny_backbone, NAMES, ["a photo of a {}."])


REPO = os.environ.get("ADAPT_CAVPT_REPO")


@pytest.mark.skipif(not REPO, reason="set ADAPT_CAVPT_REPO to a checkout of fanrena/DPT")
@pytest.mark.parametrize("epoch,bottom_limit", [(0, 2), (30, 2), (0, 1)])  # 1: CAVPT at every block
def test_logits_and_gradients_match_the_original(epoch, bottom_limit):
    from experiments.original_coop import round_to_fp16
    from experiments.original_cavpt import OriginalCAVPT, copy_state, original_gradients

    names = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    bb = make_backbone("test-vit-openai-77")
    round_to_fp16(bb)
    trainer = OriginalCAVPT(REPO, bb).dpt(names, cpn=3, bottom_limit=bottom_limit)
    method = _method(bb, names, cpn=3, bottom_limit=bottom_limit).train()
    copy_state(trainer.model, method)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, layer_logits, indices, z1, z2 = trainer.model(images)
        out = method.output(images)
    assert torch.equal(indices, out.tensors["top_k"])
    theirs_layer = torch.cat(layer_logits).permute(2, 0, 1, 3)  # [B, layers, K, C]
    for ours, theirs in ((out.logits, logits), (out.tensors["zs_image_logits"], z1),
                         (out.tensors["zs_text_logits"], z2), (out.tensors["layer_logits"], theirs_layer)):
        assert (ours - theirs).abs().max() <= 2e-5 * theirs.abs().max()
    labels = torch.cat([indices[:3, 1], indices[3:, 0]])  # each slot of the top-K hit at least once
    trainer.epoch = epoch
    method.on_train_epoch_start(epoch, 60)
    trainer.forward_backward({"img": images, "label": labels})
    method.loss(method.output(images), labels).backward()
    grads, mine = original_gradients(trainer.model), dict(method.named_parameters())
    for name, g in grads.items():
        assert (g - mine[name].grad).abs().max() <= 1e-4 * g.abs().max() + 1e-9, name
