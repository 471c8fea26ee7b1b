"""ProDA: the surrogate loss of a Gaussian over K prompts' class features, and their diversity.

No official code exists, so the formulas are pinned by hand: μ and the per-dimension covariance
against a direct computation, the surrogate as an upper bound of the expected cross-entropy under
that Gaussian (a Monte-Carlo estimate stays below it), zero correction for the true class and
for prompts without spread, the diversity term, the three layouts, and the mean classifier.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import CLASSES

NAMES = CLASSES[:4]
TEMPLATE = ["a photo of a {}."]


def _proda(backbone, **cfg):
    torch.manual_seed(0)
    return build_method("proda", cfg or None, backbone, NAMES, TEMPLATE).train()


def test_layouts_and_the_mean_classifier(tiny_backbone):
    method = _proda(tiny_backbone)
    assert [method.positions.count(p) for p in ("front", "middle", "end")] == [8, 8, 16]
    red = tiny_backbone.embed_tokens(tiny_backbone.tokenize(["red"]))[0, 1]
    layout = {p: v.embeddings_per_image(method.ctx[:1].detach())[0, 0] for p, v in method.views.items()}
    assert torch.equal(layout["front"][1], red)  # the class name right after the start token
    assert torch.equal(layout["middle"][1 + 8], red) and torch.equal(layout["end"][1 + 16], red)
    t = method.prompt_features()
    assert t.shape == (32, 4, tiny_backbone.embed_dim) and torch.allclose(t.norm(dim=-1), torch.ones(32, 4))
    # prompt 0 (front) encoded alone is its row
    alone = method.views["front"].text_features_per_image(method.ctx[:1])
    assert torch.allclose(t[:1], alone, atol=1e-6)
    feats = torch.randn(5, tiny_backbone.embed_dim)
    method.eval()
    with torch.no_grad():  # the classifier: the plain mean over the K prompts
        assert torch.allclose(method(feats), tiny_backbone.logits(F.normalize(feats, dim=-1), t.mean(0)), atol=1e-5)


def test_surrogate_logits_by_hand_and_an_upper_bound_of_the_expected_ce(tiny_backbone):
    method = _proda(tiny_backbone, prompt_batch=6)
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(3, tiny_backbone.embed_dim, generator=g), dim=-1)
    labels = torch.tensor([0, 2, 3])
    t = F.normalize(torch.randn(6, 4, tiny_backbone.embed_dim, generator=g), dim=-1) * 0.3 + 1.0
    z = method.surrogate_logits(feats, t, labels)
    s, mu, n = tiny_backbone.logit_scale, t.mean(0), 7
    for b in range(3):
        y = labels[b]
        for c in range(4):
            sig = lambda i, j: ((t[:, i] - mu[i]) * (t[:, j] - mu[j])).sum(0) / n  # noqa: E731  Σ_ij[d]
            expect = s * feats[b] @ mu[c] + 0.5 * s ** 2 * (feats[b] ** 2 * (sig(y, y) + sig(c, c) - 2 * sig(y, c))).sum()
            assert float(z[b, c]) == pytest.approx(float(expect), rel=1e-5)
        assert float(z[b, y]) == pytest.approx(float(s * feats[b] @ mu[y]), rel=1e-5)  # no correction on y
    # classifiers w ~ N(μ, Σ[d] per dimension), sampled through the prompts' deviations
    dev = (t - mu) / n ** 0.5
    eps = torch.randn(20000, 6, tiny_backbone.embed_dim, generator=g)
    w = mu + torch.einsum("skd,kcd->scd", eps, dev)  # [S, C, d]
    mc = torch.stack([F.cross_entropy(s * torch.einsum("bd,scd->sbc", feats[b:b + 1], w)[:, 0],
                                      labels[b].expand(w.shape[0])) for b in range(3)]).mean()
    surrogate = F.cross_entropy(z, labels)
    plain = F.cross_entropy(s * feats @ mu.t(), labels)
    assert float(plain) < float(mc) <= float(surrogate) + 1e-3  # Jensen: E[CE] <= the surrogate


def test_prompts_without_spread_have_no_correction_and_full_overlap(tiny_backbone):
    method = _proda(tiny_backbone)
    t = F.normalize(torch.randn(1, 4, tiny_backbone.embed_dim), dim=-1).expand(5, -1, -1)
    feats = F.normalize(torch.randn(2, tiny_backbone.embed_dim), dim=-1)
    z = method.surrogate_logits(feats, t, torch.tensor([1, 0]))
    assert torch.allclose(z, tiny_backbone.logits(feats, t[0]), atol=1e-4)
    with torch.no_grad():
        method.ctx.copy_(method.ctx[:1].expand_as(method.ctx))
    assert float(method.diversity(torch.arange(32))) == pytest.approx(1.0, abs=1e-5)


def test_a_step_uses_a_seeded_subset_and_reports_its_terms(tiny_backbone):
    method = _proda(tiny_backbone, prompt_batch=8)
    feats, labels = torch.randn(4, tiny_backbone.embed_dim), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    first = method.output(feats)
    torch.manual_seed(5)
    again = method.output(feats)
    assert torch.equal(first.tensors["index"], again.tensors["index"]) and len(set(first.tensors["index"].tolist())) == 8
    loss = method.loss(first, labels)
    assert set(first.scalars) == {"ce", "diversity"}
    assert float(loss) == pytest.approx(float(first.scalars["ce"] + first.scalars["diversity"]), rel=1e-6)
    loss.backward()
    used = first.tensors["index"]
    unused = sorted(set(range(32)) - set(used.tolist()))
    assert method.ctx.grad[used].abs().sum() > 0 and method.ctx.grad[unused].abs().sum() == 0
    plain = _proda(tiny_backbone, diversity_weight=0.0)
    out = plain.output(feats)
    assert float(plain.loss(out, labels)) == pytest.approx(float(out.scalars["ce"])) and "diversity" not in out.scalars
