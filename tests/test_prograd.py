"""ProGrad: the zero-shot teacher's KL gradient only removes the conflicting part of the CE step.

Pinned: the padded CTX_INIT initialisation; the KL term's value; λ = 0 is CoOp's step exactly;
the projection (a hand-computed case, orthogonal to the teacher's gradient, untouched without a
conflict); that the per-process gradient goes through the engine's reduction; and, with a
checkout of BeierZhu/Prompt-align named by ``ADAPT_PROGRAD_REPO``, one step of the original's
own ``forward_backward`` (its loss and its ``prograd_backward_and_update``).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import CLASSES, make_backbone

NAMES = CLASSES[:4]
TEMPLATE = ["a photo of a {}."]


def _prograd(backbone, **cfg):
    torch.manual_seed(0)
    return build_method("prograd", cfg or None, backbone, NAMES, TEMPLATE).train()


def test_context_is_the_teachers_prompt_left_padded_with_zeros(tiny_backbone):
    method = _prograd(tiny_backbone)
    ctx = method.prompts.ctx.detach()
    words = tiny_backbone.embed_tokens(tiny_backbone.tokenize(["a photo of a"]))[0, 1:5]
    assert ctx.shape[0] == 16 and torch.equal(ctx[:12], torch.zeros_like(ctx[:12]))
    assert torch.equal(ctx[12:], words)
    # the padded prompt reads "X x12 a photo of a <name>." and the context replaces its first 16 tokens
    assert method.prompts.prefix_text == " ".join(["X"] * 12 + ["a photo of a"])
    drawing = build_method("prograd", None, tiny_backbone, NAMES, ["a drawing of a {}, a type of thing."])
    expect = tiny_backbone.embed_tokens(tiny_backbone.tokenize(["a drawing of a"]))[0, 1:5]
    assert torch.equal(drawing.prompts.ctx.detach()[12:], expect)  # the words before the class name
    random = build_method("prograd", {"ctx_init": ""}, tiny_backbone, NAMES, TEMPLATE)
    assert random.prompts.ctx.shape == (16, tiny_backbone.text_width) and random.prompts.ctx.abs().min() > 0
    with pytest.raises(ValueError, match="has 4 tokens, more than the 2 context vectors"):
        build_method("prograd", {"n_ctx": 2}, tiny_backbone, NAMES, TEMPLATE)


def test_kl_term_is_the_cross_entropy_to_the_teacher(tiny_backbone):
    method = _prograd(tiny_backbone, temperature=2.0, lam=0.0)
    feats = torch.randn(5, tiny_backbone.embed_dim)
    out = method.output(feats)
    teacher = tiny_backbone.logits(F.normalize(feats, dim=-1), method.handcrafted())
    assert torch.allclose(out.tensors["teacher_logits"], teacher)
    method.loss(out, torch.tensor([0, 1, 2, 3, 0]))
    p, logq = F.softmax(teacher / 2, -1), F.log_softmax(out.logits / 2, -1)
    by_hand = (F.kl_div(logq, p, reduction="batchmean") - (p * p.log()).sum(1).mean()) * 4
    assert float(out.scalars["kl"]) == pytest.approx(float(by_hand.detach()), rel=1e-5)


def test_lambda_zero_is_coops_step(tiny_backbone):
    prograd = _prograd(tiny_backbone, lam=0.0)
    coop = build_method("coop", {"n_ctx": 16}, tiny_backbone, NAMES, TEMPLATE).train()
    with torch.no_grad():
        coop.prompts.ctx.copy_(prograd.prompts.ctx.normal_(0, 0.1))
    feats, labels = torch.randn(6, tiny_backbone.embed_dim), torch.tensor([0, 1, 2, 3, 1, 0])
    for m in (prograd, coop):
        m.loss(m.output(feats), labels).backward()
        m.transform_gradients(lambda t: t)
    assert torch.equal(prograd.prompts.ctx.grad, coop.prompts.ctx.grad)
    assert prograd._kl_grads is None  # at λ = 0 no teacher gradient is even taken


def _with_gradients(method, g_d, g_g):
    ctx = method.prompts.ctx
    ctx.grad = g_d.view_as(ctx).clone()
    method._kl_grads = [g_g.view_as(ctx).clone()]
    return ctx


def test_projection_removes_only_the_conflicting_component(tiny_backbone):
    method = _prograd(tiny_backbone)
    n = method.prompts.ctx.numel()
    e = torch.eye(n)
    # g_d = e0, g_g = -e0 + e1: they conflict; g = e0 - (e0·ĝ)ĝ = (e0 + e1) / 2
    ctx = _with_gradients(method, e[0], -e[0] + e[1])
    method.transform_gradients(lambda t: t)
    assert torch.allclose(ctx.grad.flatten(), (e[0] + e[1]) / 2, atol=1e-7)
    assert method.scalars() == {"conflict_rate": 1.0}
    # random conflicting pair: the result is orthogonal to g_g and keeps g_d's other part
    g = torch.Generator().manual_seed(0)
    g_d, g_g = torch.randn(n, generator=g), torch.randn(n, generator=g)
    g_g = g_g - 2 * (g_g @ g_d).clamp(min=0) / (g_d @ g_d) * g_d  # make the cosine negative
    assert g_d @ g_g < 0
    ctx = _with_gradients(method, g_d, g_g)
    method.transform_gradients(lambda t: t)
    assert abs(float(ctx.grad.flatten() @ g_g)) < 1e-4 * float(g_d.norm() * g_g.norm())
    assert torch.allclose(ctx.grad.flatten() - g_d, -(g_d @ g_g) / (g_g @ g_g) * g_g, atol=1e-5)
    # no conflict: CE's gradient is used as it is; λ = 0.5 removes half the component
    ctx = _with_gradients(method, g_d, -g_g)
    method.transform_gradients(lambda t: t)
    assert torch.equal(ctx.grad.flatten(), g_d) and method.scalars() == {"conflict_rate": 2 / 3}
    half = _prograd(tiny_backbone, lam=0.5)
    ctx = _with_gradients(half, e[0], -e[0] + e[1])
    half.transform_gradients(lambda t: t)
    assert torch.allclose(ctx.grad.flatten(), 0.75 * e[0] + 0.25 * e[1], atol=1e-7)


def test_the_teacher_gradient_is_reduced_over_processes_before_it_is_compared(tiny_backbone):
    """Under DDP the .grad is already the average of the processes' gradients; the teacher's,
    taken with autograd.grad, must be averaged too (the engine's ``reduce``)."""
    method = _prograd(tiny_backbone)
    e = torch.eye(method.prompts.ctx.numel())
    seen = []
    ctx = _with_gradients(method, e[0], e[0] + e[1])  # agrees locally ...
    method.transform_gradients(lambda t: seen.append(t.clone()) or -t)  # ... not after the reduction
    assert len(seen) == 1 and torch.equal(seen[0].flatten(), e[0] + e[1])
    assert torch.allclose(ctx.grad.flatten(), (e[0] - e[1]) / 2, atol=1e-7)  # projected off -(e0 + e1)


def test_accumulated_micro_batches_sum_the_teacher_gradient(tiny_backbone):
    method = _prograd(tiny_backbone)
    feats, labels = torch.randn(8, tiny_backbone.embed_dim), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    method.loss(method.output(feats[:4]), labels[:4])
    first = method._kl_grads[0].clone()
    method.loss(method.output(feats[4:]), labels[4:])
    out = method.output(feats[4:])
    out.scalars.clear()
    second = torch.autograd.grad(
        -(F.softmax(out.tensors["teacher_logits"], -1) * F.log_softmax(out.logits, -1)).sum(1).mean(),
        method.prompts.ctx)[0]
    assert torch.allclose(method._kl_grads[0], first + second, atol=1e-6)


REPO = os.environ.get("ADAPT_PROGRAD_REPO")


@pytest.mark.skipif(not REPO, reason="set ADAPT_PROGRAD_REPO to a checkout of BeierZhu/Prompt-align")
def test_one_step_matches_the_originals_forward_backward(capsys):
    from experiments.original_coop import SGD, round_to_fp16
    from experiments.original_prograd import OriginalProGrad

    names = ["tench", "goldfish", "great white shark", "tiger shark"]
    bb = make_backbone("test-vit-openai-77")
    round_to_fp16(bb)
    trainer = OriginalProGrad(REPO, bb).prograd(names)
    method = build_method("prograd", None, bb, names, ["a photo of a {}."]).train()
    learner = trainer.model.prompt_learner
    assert torch.equal(learner.ctx.detach(), method.prompts.ctx.detach())  # the same CTX_INIT padding
    assert "Initial context" in capsys.readouterr().out  # the original's own constructor ran
    conflicts = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # other values than the initialisation, the same in both
            method.prompts.ctx.normal_(0, 0.1, generator=g)
            learner.ctx.copy_(method.prompts.ctx)
        images, labels = torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 4, (3,), generator=g)
        trainer.optim.state.clear()
        trainer.forward_backward({"img": images, "label": labels})
        opt = torch.optim.SGD(method.trainable_parameters(), **SGD)
        before = method.conflicts
        method.loss(method.output(images), labels).backward()
        method.transform_gradients(lambda t: t)
        opt.step()
        method.prompts.ctx.grad = None
        conflicts += method.conflicts - before
        moved = learner.ctx.detach()
        assert (moved - method.prompts.ctx.detach()).abs().max() <= 1e-6 * moved.abs().max(), seed
    assert conflicts > 0  # the projection itself was compared, not only the plain step
