"""Bayesian prompt learning (global variant): a Gaussian shift of CoOp's context, trained on
Monte-Carlo samples, evaluated on a seeded set of them.

Pinned: with the shift's variance at zero and its mean at zero it is CoOp (the log of CoOp's
softmax); the loss by hand (MC log-likelihood + 0.001·KL, the KL against torch.distributions);
evaluation that does not depend on the batch and repeats exactly, and ``eval_samples: 0`` at the
mean; and, with a checkout of saic-fi/Bayesian-Prompt-Learning in ``ADAPT_BPL_REPO``, the
original's loss and gradients on the same draws.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import CLASSES, make_backbone

NAMES = CLASSES[:4]
TEMPLATE = ["a photo of a {}."]


def _bpl(backbone, **cfg):
    torch.manual_seed(0)
    return build_method("bpl", cfg or None, backbone, NAMES, TEMPLATE)


def test_with_no_spread_it_is_coop(tiny_backbone):
    bpl = _bpl(tiny_backbone).eval()
    coop = build_method("coop", {"ctx_init": "a photo of a"}, tiny_backbone, NAMES, TEMPLATE).eval()
    with torch.no_grad():
        bpl.prompts.ctx.normal_(0, 0.1)
        coop.prompts.ctx.copy_(bpl.prompts.ctx)
        bpl.logvar_posterior.fill_(-80.0)  # σ = e^-40: every sample is ctx + μ = ctx
    feats = torch.randn(5, tiny_backbone.embed_dim)
    with torch.no_grad():
        expect = F.log_softmax(coop(feats), dim=-1)
        assert torch.allclose(bpl(feats), expect, atol=1e-5)
        bpl.train()
        out = bpl.output(feats)
        assert torch.allclose(out.tensors["sample_logits"], coop(feats).expand(10, -1, -1), atol=1e-4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    nll = float(bpl.loss(out, labels) - 0.001 * bpl.kl())
    assert nll == pytest.approx(float(F.cross_entropy(coop(feats), labels)), rel=1e-4)


def test_loss_is_the_mc_log_likelihood_plus_the_kl(tiny_backbone):
    bpl = _bpl(tiny_backbone, samples=3).train()
    with torch.no_grad():
        bpl.mean_posterior.normal_(0, 0.3)
    feats, labels = torch.randn(4, tiny_backbone.embed_dim), torch.tensor([2, 0, 1, 3])
    out = bpl.output(feats)
    z = out.tensors["sample_logits"]
    assert z.shape == (3, 4, 4)
    p = F.softmax(z, dim=-1)[:, torch.arange(4), labels]  # [L, B]
    by_hand = -torch.log(p.mean(0)).mean()
    post = torch.distributions.Normal(bpl.mean_posterior, bpl.logvar_posterior.exp().sqrt())
    kl = torch.distributions.kl_divergence(post, torch.distributions.Normal(0.0, 1.0)).mean()
    assert float(bpl.kl()) == pytest.approx(float(kl), rel=1e-5)
    loss = bpl.loss(out, labels)
    assert float(loss) == pytest.approx(float(by_hand + 0.001 * kl), rel=1e-5)
    assert torch.allclose(out.logits, torch.log(F.softmax(z, -1).mean(0)), atol=1e-5)
    loss.backward()
    assert bpl.logvar_posterior.grad.abs().sum() > 0 and bpl.mean_posterior.grad.abs().sum() > 0


def test_evaluation_is_seeded_and_independent_of_the_batch(tiny_backbone):
    bpl = _bpl(tiny_backbone).eval()
    feats = torch.randn(6, tiny_backbone.embed_dim)
    with torch.no_grad():
        whole = bpl(feats)
        assert torch.allclose(torch.cat([bpl(feats[:1]), bpl(feats[1:4]), bpl(feats[4:])]), whole, atol=1e-6)
        bpl.train(), bpl.eval()  # a new evaluation: the same draws
        assert torch.equal(bpl(feats), whole)
        other = _bpl(tiny_backbone, eval_seed=1).eval()
        assert not torch.allclose(other(feats), whole, atol=1e-4)  # the draws are the seed's
        mean = _bpl(tiny_backbone, eval_samples=0).eval()
        text = mean.prompts.text_features(mean.prompts.ctx + mean.mean_posterior)
        assert torch.allclose(mean(feats), tiny_backbone.logits(F.normalize(feats, dim=-1), text), atol=1e-5)


REPO = os.environ.get("ADAPT_BPL_REPO")


def test_the_conditional_variant_gives_each_image_its_posterior(tiny_backbone):
    bpl = _bpl(tiny_backbone, variant="conditional", samples=4)
    assert {n for n, p in bpl.named_parameters() if p.requires_grad} == {
        "prompts.ctx", *(f"meta_{k}.{i}.{w}" for k in ("mean", "logvar") for i in (0, 2, 4) for w in ("weight", "bias"))}
    feats = torch.randn(3, tiny_backbone.embed_dim)
    bpl.train()
    out = bpl.output(feats)
    mu, logvar = bpl.posterior(F.normalize(feats, dim=-1))
    assert mu.shape == (3, bpl.prompts.ctx.shape[-1]) and not torch.allclose(mu[0], mu[1])
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, logvar.exp().sqrt()),
                                           torch.distributions.Normal(0.0, 1.0)).mean()
    assert float(bpl.kl(F.normalize(feats, dim=-1))) == pytest.approx(float(kl), rel=1e-5)
    bpl.loss(out, torch.tensor([0, 1, 2])).backward()
    assert bpl.meta_logvar[0].weight.grad.abs().sum() > 0
    bpl.eval()
    with torch.no_grad():  # one ε per evaluation, each image its own μ and σ: batch-independent
        whole = bpl(feats)
        assert torch.allclose(torch.cat([bpl(feats[:1]), bpl(feats[1:])]), whole, atol=1e-6)


@pytest.mark.skipif(not REPO, reason="set ADAPT_BPL_REPO to a checkout of saic-fi/Bayesian-Prompt-Learning")
@pytest.mark.parametrize("variant", ["global", "conditional"])
def test_loss_and_gradients_match_the_original(variant, capsys):
    from experiments.original_bpl import OriginalBPL
    from experiments.original_coop import round_to_fp16

    names = ["tench", "goldfish", "great white shark", "tiger shark"]
    bb = make_backbone("test-vit-openai-77-e64")  # the shift is added in the text width
    round_to_fp16(bb)
    theirs = OriginalBPL(REPO, bb).bpl(names, samples=5, variant=variant)
    ours = build_method("bpl", {"samples": 5, "variant": variant}, bb, names, TEMPLATE).train()
    assert "Initial context" in capsys.readouterr().out
    learner = theirs.prompt_learner
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.prompts.ctx.normal_(0, 0.1, generator=g)
        learner.ctx.copy_(ours.prompts.ctx)
        if variant == "global":
            ours.mean_posterior.normal_(0, 0.1, generator=g)
            learner.mean_posterior.copy_(ours.mean_posterior[None])
            learner.std_posterior.copy_(ours.logvar_posterior[None])
            pairs = [("mean_posterior", "mean_posterior"), ("logvar_posterior", "std_posterior")]
        else:  # the meta nets, layer by layer
            pairs = []
            for ours_net, theirs_net in (("meta_mean", "weight_mean"), ("meta_logvar", "weight_log_variance")):
                for i in (0, 2, 4):
                    for w in ("weight", "bias"):
                        getattr(getattr(learner.meta_net, theirs_net).module[i], w).copy_(
                            getattr(getattr(ours, ours_net)[i], w))
                        pairs.append((f"{ours_net}.{i}.{w}", f"meta_net.{theirs_net}.module.{i}.{w}"))
    batch = 2 if variant == "global" else 1  # the original's conditional shift broadcasts right at batch 1 only
    images, labels = torch.randn(batch, 3, 32, 32, generator=g), torch.tensor([1, 3][:batch])
    torch.manual_seed(7)
    loss_theirs = theirs(images, labels).sum()
    torch.manual_seed(7)
    loss_ours = ours.loss(ours.output(images), labels)
    assert float(loss_ours) == pytest.approx(float(loss_theirs), rel=1e-5)
    loss_theirs.backward(), loss_ours.backward()
    grads_theirs = dict(learner.named_parameters())
    grads_ours = dict(ours.named_parameters())
    checks = [(learner.ctx.grad, ours.prompts.ctx.grad)]
    checks += [(grads_theirs[t].grad.reshape(grads_ours[o].shape), grads_ours[o].grad) for o, t in pairs]
    for a, b in checks:
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    theirs.eval(), ours.eval()
    with torch.no_grad():  # evaluation: the same estimator (the original's draws are its own)
        assert theirs(images).shape == ours(images).shape
        assert math.isclose(float(torch.logsumexp(ours(images), -1).max()), 0.0, abs_tol=1e-5)
