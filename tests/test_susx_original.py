"""adapt's TIP-X (``susx``) against the original's own functions, imported from a checkout of
vishaal27/SuS-X that ``ADAPT_SUSX_REPO`` names (skipped without one; nothing of it is committed).

tipx.py's functions are plain torch on features: random unit features stand in for CLIP's. Its
``import clip`` is stubbed (only the script's ``__main__`` uses it), and ``Tensor.cuda`` /
``Tensor.half`` are the identity while it runs: its fp16 casts are the GPU's storage, and CPU
fp16 would make the comparison one of rounding; its ``accuracy`` gets a NumPy-2-safe ``float``. Compared: the KL matrix, ψ (``scale_``), the
logits at a fixed (α, β, γ) and the triple its 200,000-point search selects on a small val set
(N a multiple of 100, where its block loop fills every row), then the rows it leaves at 0.
"""
from __future__ import annotations

import builtins
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method

REPO = os.environ.get("ADAPT_SUSX_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="set ADAPT_SUSX_REPO to a checkout of vishaal27/SuS-X")
C, D, M = 5, 16, 50


@pytest.fixture(scope="module")
def tipx():
    """tipx.py as a module, with ``clip`` stubbed and ``utils`` its own (removed again after)."""
    saved = {k: sys.modules.get(k) for k in ("clip", "utils", "utils.utils")}
    sys.modules["clip"] = types.ModuleType("clip")
    sys.path.insert(0, REPO)
    try:
        with torch.random.fork_rng():  # it seeds the global generators at import
            spec = importlib.util.spec_from_file_location("tipx_original", Path(REPO) / "tipx.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        # its ``accuracy`` calls float() on a 1-element array, which NumPy 2 refuses: the
        # module's own ``float`` takes such an array (nothing else of its code changes)
        module.float = lambda x: builtins.float(np.asarray(x).reshape(-1)[0]) if hasattr(x, "shape") else builtins.float(x)
    finally:
        sys.path.remove(REPO)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@pytest.fixture(autouse=True)
def _cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "half", lambda self, *a, **k: self)


def _data(n_val: int, n_test: int, seed: int = 0):
    """Class directions W [C, D]; support, val and test features near their class's direction."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(C, D, generator=g), dim=-1)

    def near(labels, noise):
        return F.normalize(w[labels] + noise * torch.randn(len(labels), D, generator=g), dim=-1)

    support_y = torch.arange(M) % C
    val_y, test_y = torch.randint(0, C, (n_val,), generator=g), torch.randint(0, C, (n_test,), generator=g)
    return w, near(support_y, 1.0), support_y, near(val_y, 1.6), val_y, near(test_y, 1.6), test_y


def _susx(tiny_backbone, w, keys, labels, **config):
    method = build_method("susx", config, tiny_backbone, [f"class {i}" for i in range(C)], ["a photo of a {}."])
    method.text_features = w  # the random classifier in place of the text tower's
    method._set_cache(keys, labels)
    return method.eval()


def test_kl_matrix_psi_and_logits_match_the_original(tipx, tiny_backbone):
    w, keys, sy, val, vy, test, ty = _data(200, 100)
    method = _susx(tiny_backbone, w, keys, sy)
    q, p_test, p_val = tipx.compute_image_text_distributions(0.5, keys.t(), test, val, w.t())
    theirs_kl = tipx.get_kl_divergence_sims(q, p_val)
    ours_kl = method.kl_divergence(val)
    assert (theirs_kl - ours_kl).abs().max() <= 1e-5 and theirs_kl.abs().min() > 0
    affinity = val @ keys.t()
    method.fit_psi(val)
    assert torch.allclose(tipx.scale_(theirs_kl, affinity), method.psi(ours_kl), atol=1e-5)
    # the logits of its search loop at one (α, β, γ), from its own pieces
    alpha, beta, gamma = 3.0, 5.5, 1.7
    values = F.one_hot(sy, C).float()
    cache = ((-1) * (beta - beta * affinity)).exp() @ values
    theirs = 100.0 * val @ w.t() + (-tipx.scale_(theirs_kl, affinity)) @ values * gamma + cache * alpha
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        getattr(method, name).fill_(value)
    with torch.no_grad():
        ours = method.forward_features(val)
    assert (theirs - ours).abs().max() <= 1e-4 * theirs.abs().max()


def test_the_search_selects_the_originals_triple(tipx, tiny_backbone):
    w, keys, sy, val, vy, test, ty = _data(200, 100, seed=1)
    method = _susx(tiny_backbone, w, keys, sy)
    q, p_test, p_val = tipx.compute_image_text_distributions(0.5, keys.t(), test, val, w.t())
    val_kl, test_kl = tipx.get_kl_divergence_sims(q, p_val), tipx.get_kl_divergence_sims(q, p_test)
    test_acc, *triple = tipx.hparam_search(val, vy, test, ty, keys.t(), F.one_hot(sy, C).float(), w.t(),
                                           val_kl, test_kl)
    method._val = (val, vy)
    method.fit_psi(val)
    found = method.search_hparams()
    assert (found["alpha"], found["beta"], found["gamma"]) == tuple(triple)
    assert found["val_acc"] < 100  # a real choice among many triples, not a saturated grid
    # its test accuracy, from test's own KL range and the search loop's val affinity range
    # (departure 2): set that map and adapt scores test as the original did
    kl = method.kl_divergence(test)
    method.kl_min.fill_(float(kl.min()))
    method.kl_max.fill_(float(kl.max()))
    with torch.no_grad():
        acc = 100.0 * float((method.forward_features(test).argmax(-1) == ty).float().mean())
    assert abs(acc - test_acc) < 1e-6


def test_the_original_leaves_the_last_rows_at_zero_and_adapt_computes_them(tipx, tiny_backbone):
    w, keys, sy, val, vy, *_ = _data(150, 1)
    method = _susx(tiny_backbone, w, keys, sy)
    q, _, p_val = tipx.compute_image_text_distributions(0.5, keys.t(), val[:1], val, w.t())
    theirs, ours = tipx.get_kl_divergence_sims(q, p_val), method.kl_divergence(val)
    assert (theirs[:100] - ours[:100]).abs().max() <= 1e-5
    assert (theirs[100:] == 0).all() and (ours[100:] > 0).all()
    # adapt's rows past 100 are the definition, element by element
    p, log_q = torch.softmax(val[100:] @ w.t() / 0.5, -1), torch.log_softmax(keys @ w.t() / 0.5, -1)
    direct = (p[:, None, :] * (p.log()[:, None, :] - log_q[None])).sum(-1)
    assert (direct - ours[100:]).abs().max() <= 1e-5
