"""UPT: the generated prompts equal a hand computation of the code's formula (each token through
the layer alone by default, all tokens attending to each other with ``attention: joint``), the
logits are CLIP's with those prompts in the CoOp slots and after the patch tokens, the bad options
are refused; and, with a checkout of yuhangzang/UPT named by ``ADAPT_UPT_REPO``, logits and
gradients equal the original's ``CustomCLIP``."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import make_backbone

NAMES = ["red", "green", "blue"]


def _method(backbone, names=NAMES, **config):
    torch.manual_seed(0)
    method = build_method("upt", config or None, backbone, names, ["a photo of a {}."]).eval()
    with torch.no_grad():  # away from the default init (LayerNorms at 1/0), the same per seed
        for p in method.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return method


def _hand_tokens(g, joint: bool) -> torch.Tensor:
    """The code's PromptLearner layer written out (eval mode: no dropout)."""
    u, d = g.uni_ctx, g.uni_ctx.shape[1]
    wq, wk, wv = g.self_attn.in_proj_weight.split(d)
    bq, bk, bv = g.self_attn.in_proj_bias.split(d)
    v = u @ wv.t() + bv
    if joint:  # softmax over all tokens
        a = torch.softmax((u @ wq.t() + bq) @ (u @ wk.t() + bk).t() / math.sqrt(d), dim=-1) @ v
    else:  # a sequence of one: the only key has weight 1
        a = v
    u1 = F.layer_norm(u + a @ g.self_attn.out_proj.weight.t() + g.self_attn.out_proj.bias, (d,),
                      g.norm1.weight, g.norm1.bias)
    h = F.relu(F.layer_norm(u1, (d,), g.norm2.weight, g.norm2.bias) @ g.linear1.weight.t() + g.linear1.bias)
    return u1 + h @ g.linear2.weight.t() + g.linear2.bias


@pytest.mark.parametrize("attention", ["token", "joint"])
def test_logits_equal_a_hand_computation_of_the_formula(attention, tiny_backbone):
    method = _method(tiny_backbone, attention=attention)
    g, bb = method.generator, tiny_backbone
    with torch.no_grad():
        u2 = _hand_tokens(g, attention == "joint")
        assert torch.allclose(g.text(), u2[:4], atol=1e-5) and torch.allclose(g.vision(), g.mlp(u2[4:]), atol=1e-5)
        tokens = bb.tokenize([f"X X X X {n}." for n in NAMES])
        emb = bb.embed_tokens(tokens)
        emb[:, 1:5] = u2[:4]
        text = bb.encode_text_embeddings(emb, tokens)
        images = torch.randn(2, 3, 32, 32)
        vision = u2[4:] @ g.mlp.weight.t() + g.mlp.bias
        expected = bb.logit_scale * bb.encode_image(images, prompts=vision) @ text.t()
        assert torch.allclose(method(images), expected, atol=1e-4)
        assert not torch.allclose(method(images), bb.logits(bb.encode_image(images), text), atol=1e-3)


def test_the_codes_attention_keeps_tokens_apart_and_the_papers_mixes_them(tiny_backbone):
    for attention, mixes in (("token", False), ("joint", True)):
        g = _method(tiny_backbone, attention=attention).generator
        with torch.no_grad():
            before = g.tokens().clone()
            g.uni_ctx[7] += 1.0  # move one visual token
            after = g.tokens()
        assert not torch.allclose(after[7], before[7])
        assert torch.allclose(after[:7], before[:7], atol=1e-6) != mixes, attention


def test_text_and_vision_prompts_get_their_own_dropout_draw_in_training(tiny_backbone):
    g = _method(tiny_backbone).generator.train()
    torch.manual_seed(3)
    first, second = g.tokens(), g.tokens()
    assert not torch.allclose(first, second)
    g.eval()
    assert torch.equal(g.tokens(), g.tokens())


@pytest.mark.parametrize("config,message", [
    ({"attention": "sequence"}, "method.attention='sequence' is not one of"),
    ({"n_vision": 0}, "must be >= 1 .UPT prompts both towers"),
    ({"dropout": 1.0}, r"method.dropout must be in \[0, 1\)"),
])
def test_bad_options_are_refused_in_one_message(config, message, tiny_backbone):
    with pytest.raises(ValueError, match=message):
        build_method("upt", config, tiny_backbone, NAMES, ["a photo of a {}."])


REPO = os.environ.get("ADAPT_UPT_REPO")


@pytest.mark.skipif(not REPO, reason="set ADAPT_UPT_REPO to a checkout of yuhangzang/UPT")
def test_logits_and_gradients_match_the_original(capsys):
    from experiments.original_coop import round_to_fp16
    from experiments.original_upt import NAMES as PARAMS, OriginalUPT, copy_generator_state

    names = ["tench", "goldfish", "great white shark", "tiger shark"]
    bb = make_backbone("test-vit-openai-77")
    round_to_fp16(bb)
    model = OriginalUPT(REPO, bb).custom_clip(names)
    assert "Initial context" in capsys.readouterr().out  # the original's own constructor ran
    method = _method(bb, names)
    copy_generator_state(model, method)
    model.eval()  # dropout off in both: the same function, the same gradients
    images, labels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 1])
    theirs, ours = model(images), method(images)
    assert (theirs - ours).abs().max() <= 2e-5 * theirs.abs().max()
    F.cross_entropy(theirs, labels).backward()
    F.cross_entropy(ours, labels).backward()
    learner, mine = model.prompt_learner, dict(method.generator.named_parameters())
    for name in PARAMS:
        g_theirs, g_ours = learner.get_parameter(name).grad, mine[name].grad.reshape(learner.get_parameter(name).shape)
        assert (g_theirs - g_ours).abs().max() <= 1e-4 * g_theirs.abs().max() + 1e-9, name
