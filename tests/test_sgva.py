"""SgVA-CLIP: the adapter formula, its identity setting, the fused logits, the three loss terms and
the prototypes by hand; parity with the original's Weight_Adapter behind ADAPT_SGVA_REPO."""
from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import CLASSES

NAMES = CLASSES[:4]


def _sgva(backbone, datamodule=None, **config):
    torch.manual_seed(0)
    method = build_method("sgva", config or None, backbone, NAMES, ["a photo of a {}."])
    if datamodule is not None:
        method.setup(datamodule)
    return method


def _raw(method, n=6, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, method.backbone.embed_dim)


def test_adapter_formula_by_hand(tiny_backbone):
    a = _sgva(tiny_backbone).adapter
    with torch.no_grad():
        a.alpha.fill_(0.3)
    v = torch.randn(5, a.linear1.in_features)
    w1, w2 = a.linear1.weight, a.linear2.weight
    assert w1.shape == (2 * v.shape[1], v.shape[1]) and w2.shape == (v.shape[1], 2 * v.shape[1])
    hand = torch.clamp(0.3 * (torch.clamp(v @ w1.t(), min=0) @ w2.t()) + 0.7 * v, min=0)
    assert torch.allclose(a(v), hand, atol=1e-6)
    assert float(_sgva(tiny_backbone).adapter.alpha.detach()) == 0.5


def test_adapter_is_the_identity_on_v_at_alpha_zero_or_zero_weights(tiny_backbone):
    m = _sgva(tiny_backbone)
    v = torch.rand(5, m.adapter.linear1.in_features)  # non-negative: the outer ReLU keeps it
    with torch.no_grad():
        m.adapter.alpha.zero_()
    assert torch.equal(m.adapter(v), v)
    with torch.no_grad():
        m.adapter.alpha.fill_(0.5)
        m.adapter.linear2.weight.zero_()
    assert torch.allclose(m.adapter(v), 0.5 * v)  # scale only: û is v/‖v‖
    assert torch.allclose(m.adapted(v @ m.proj), F.normalize(v, dim=-1), atol=1e-5)


def test_pinv_recovers_v(tiny_backbone):
    m = _sgva(tiny_backbone)
    f = _raw(m)
    v = m.unproject(f)
    assert torch.allclose(v, f @ torch.linalg.pinv(m.backbone.model.visual.proj.float()), atol=1e-6)
    assert torch.allclose(v @ m.proj, f, atol=1e-4)  # P has full column rank here


def test_fused_logits_at_lambda_zero_are_coops(tiny_backbone, tiny_datamodule):
    m = _sgva(tiny_backbone, tiny_datamodule, fuse_lambda=0.0).eval()
    coop = build_method("coop", {"n_ctx": 4}, tiny_backbone, NAMES, ["a photo of a {}."]).eval()
    with torch.no_grad():
        coop.prompts.ctx.copy_(m.prompts.ctx)
        f = _raw(m)
        assert torch.allclose(m(f), coop(f), atol=1e-5)
    m.config.fuse_lambda = 0.5
    with torch.no_grad():
        z = F.normalize(f, dim=-1)
        s = tiny_backbone.logit_scale
        clip = tiny_backbone.logits(z, m.prompts.text_features())
        proto = s * m.adapted(f) @ m.prototypes.t()
        assert torch.allclose(m(f), 0.5 * proto + 0.5 * clip, atol=1e-4)


def test_ensemble_init_is_the_mean_of_the_phrases(tiny_backbone):
    from adapt.methods.sgva import ENSEMBLE_PHRASES
    m = _sgva(tiny_backbone)
    emb = tiny_backbone.embed_tokens(tiny_backbone.tokenize(list(ENSEMBLE_PHRASES)))[:, 1:5].mean(0)
    assert torch.allclose(m.prompts.ctx, emb, atol=1e-6)
    assert m.prompts.prefix_text == "X X X X"
    assert _sgva(tiny_backbone, ctx_init="a photo of a").prompts.prefix_text == "a photo of a"


def test_prototypes_are_class_means_and_follow_the_adapter(tiny_backbone, tiny_datamodule):
    m = _sgva(tiny_backbone, tiny_datamodule)
    u = m.adapted(m.train_features).detach()
    for c in range(len(NAMES)):
        assert torch.allclose(m.prototypes[c], u[m.train_labels == c].mean(0), atol=1e-6)
    with torch.no_grad():  # as an optimizer step would
        m.adapter.linear1.weight.add_(0.1)
    m.eval()  # evaluation sees the final adapter's prototypes
    u = m.adapted(m.train_features).detach()
    assert torch.allclose(m.prototypes[0], u[m.train_labels == 0].mean(0), atol=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_three_loss_terms_by_hand(tiny_backbone, tiny_datamodule, detach):
    m = _sgva(tiny_backbone, tiny_datamodule, detach_teacher=detach).train()
    f, y = _raw(m, 4), torch.tensor([0, 1, 2, 3])
    out = m.output(f)
    loss = m.loss(out, y)
    s, T = tiny_backbone.logit_scale, 5.0
    z = F.normalize(f, dim=-1)
    text = m.prompts.text_features()
    u = m.adapted(f)
    protos = torch.stack([m.adapted(m.train_features)[m.train_labels == c].mean(0) for c in range(4)])
    vision = F.cross_entropy(s * u @ protos.t(), y)
    teacher = s * z @ text.t()
    student = s * (u @ tiny_backbone.model.visual.proj) @ text.t()
    kd = -(F.softmax(teacher / T, -1) * F.log_softmax(student / T, -1)).sum(-1).mean()
    cross = F.cross_entropy(teacher, y)
    assert torch.allclose(loss, vision + kd + cross, atol=1e-4)
    for k, v in (("vision", vision), ("kd", kd), ("cross", cross)):
        assert torch.allclose(out.scalars[k], v, atol=1e-4)
    # the teacher is not detached (the original): the KD term alone reaches the prompts
    m.zero_grad()
    kd_only = -(F.softmax(out.tensors["clip_logits"] / T, -1)
                * F.log_softmax(out.tensors["student_logits"] / T, -1)).sum(-1).mean()
    if detach:
        return
    kd_only.backward()
    assert m.prompts.ctx.grad is not None and m.prompts.ctx.grad.abs().sum() > 0


def test_param_groups_give_prompt_and_adapter_their_rates(tiny_backbone):
    g = _sgva(tiny_backbone).param_groups()
    assert g["prompt"].params[0] is g["prompt"].params[0] and g["adapter"].lr_scale == pytest.approx(0.8)
    assert len(g["adapter"].params) == 3


# ---------------------------------------------------------------- parity with the original -------

def _original_weight_adapter(repo: Path):
    """The original's Weight_Adapter class, executed from its source with fp16 / cuda stubbed."""
    source = (repo / "models" / "coop_4.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Weight_Adapter")
    fake_torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fake_torch.HalfTensor = lambda x: _Cpu(torch.tensor(x, dtype=torch.float32))
    scope = {"torch": fake_torch, "nn": torch.nn, "print": lambda *a, **k: None}
    exec(compile(ast.Module([node], []), str(repo / "models/coop_4.py"), "exec"), scope)
    return scope["Weight_Adapter"]


class _Cpu(torch.Tensor):
    def cuda(self, *a, **k):  # noqa: D102
        return self


@pytest.mark.skipif(not os.environ.get("ADAPT_SGVA_REPO"), reason="set ADAPT_SGVA_REPO to the original's checkout")
def test_adapter_matches_the_original_weight_adapter(tiny_backbone):
    Original = _original_weight_adapter(Path(os.environ["ADAPT_SGVA_REPO"]))
    visual = tiny_backbone.model.visual
    clip_model = types.SimpleNamespace(dtype=torch.float32, visual=visual)
    cfg = types.SimpleNamespace(visual_pre="T", backbone="ViT-B/16", adapter_dim="_dim_x2")
    ref = Original(cfg, clip_model)
    m = _sgva(tiny_backbone)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        m.adapter.linear1.weight.copy_(ref.linear1.weight)
        m.adapter.linear2.weight.copy_(ref.linear2.weight)
        m.adapter.alpha.copy_(ref.alpha)
    f = _raw(m)
    v = (f.float() @ torch.pinverse(visual.proj.float()))  # the original's CustomCLIP.forward
    expected = ref(v.as_subclass(_Cpu)).as_subclass(torch.Tensor)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    sabotage = float(os.environ.get("ADAPT_SGVA_SABOTAGE", "0"))  # shows the check can fail
    with torch.no_grad():
        m.adapter.alpha.add_(sabotage)
        assert torch.allclose(m.adapted(f), expected, atol=1e-5)
