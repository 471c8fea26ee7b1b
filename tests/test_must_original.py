"""Parity with salesforce/MUST's own modules, skipped unless ADAPT_MUST_REPO names a checkout:
its ``VisionTransformer_MIM`` (clip/model.py) given this method's weights returns the same logits,
reconstruction and per-patch alignment on the same masked images, its L_mim formula gives this
method's term, and its timm-style ``ModelEma`` (ema.py) at the ramped decay gives this method's
teacher. The original's file imports ``_scaled_dot_product_attention`` from torch, gone since
torch 2.0; it is only used by a MultiheadAttention copy the ViT does not use, so a stand-in is
put there for the import."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import CLASSES, make_backbone

REPO = os.environ.get("ADAPT_MUST_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="set ADAPT_MUST_REPO to a salesforce/MUST checkout")
NAMES = CLASSES[:4]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def original():
    if not hasattr(F, "_scaled_dot_product_attention"):
        F._scaled_dot_product_attention = lambda *a, **k: None  # unused by the ViT (see above)
    return _load("must_clip_model", Path(REPO) / "clip" / "model.py"), _load("must_ema", Path(REPO) / "ema.py")


def _pair(original):
    """This method on a tiny OpenAI-layout ViT (QuickGELU, 16-px patches, 32-px images: a 2 x 2
    grid) and the original's ViT holding exactly its weights."""
    clip_model, _ = original
    bb = make_backbone("test-vit-openai")
    torch.manual_seed(0)
    ours = build_method("must", {"mask_patch": 16, "mask_ratio": 0.5, "logit_scale": 100.0}, bb, NAMES,
                        ["a photo of a {}."]).train()
    v = ours.backbone.model.visual
    theirs = clip_model.VisionTransformer_MIM(input_resolution=32, patch_size=16, width=v.conv1.out_channels,
                                              layers=len(v.transformer.resblocks), heads=1,
                                              output_dim=v.proj.shape[1], mask=True)
    state = {k: t for k, t in v.state_dict().items()}
    state["mask_token_embedding"] = ours.mask_token.detach().view(1, 1, -1)
    state.update({f"ln_patch.{k}": t for k, t in ours.ln_patch.state_dict().items()})
    state.update({f"decoder.{k}": t for k, t in ours.decoder.state_dict().items()})
    theirs.load_state_dict(state, strict=True)
    theirs.classifier = torch.nn.Parameter(ours.classifier.detach().clone())
    return ours, theirs


def test_masked_forward_equals_the_originals(original):
    ours, theirs = _pair(original)
    g = torch.Generator().manual_seed(4)
    weak, strong = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    grid = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 1], [0, 0]]])  # the original's [B, h, w] mask
    ours.draw_mask = lambda images: grid.flatten(1).bool()
    out = ours.output(torch.stack([weak, strong], dim=1))
    with torch.no_grad():
        logits, x_rec, loss_align, pix = theirs(strong, mask=grid)
        plain = theirs(weak)
        # engine_self_training.py's two formulas
        mim = (F.l1_loss(x_rec, strong, reduction="none") * pix).sum() / pix.sum() / strong.size(1)
        align = torch.mean(loss_align)
    assert (out.logits - logits).abs().max() <= 1e-4
    assert torch.equal(out.tensors["pseudo_labels"], plain.softmax(-1).max(-1)[1])
    assert out.tensors["mim"].item() == pytest.approx(mim.item(), rel=1e-5)
    assert out.tensors["align"].item() == pytest.approx(align.item(), rel=1e-5)


def test_the_teacher_equals_the_originals_model_ema(original):
    _, ema = original
    ours, theirs = _pair(original)
    theirs_ema = ema.ModelEma(theirs, decay=0.9998)
    cfg = ours.config
    cfg.ema_decay_init, cfg.ema_warm_steps = 0.5, 3  # a short ramp, so that every step differs
    g = torch.Generator().manual_seed(6)
    mapping = {"backbone.model.visual." + k: k for k in theirs.state_dict() if
               "backbone.model.visual." + k in ours.live_tensors()}
    mapping.update(classifier="classifier", mask_token="mask_token_embedding")
    live, their_state = ours.live_tensors(), theirs.state_dict()
    for it in range(4):
        with torch.no_grad():
            for name, key in mapping.items():
                step = torch.randn(live[name].shape, generator=g)
                live[name].add_(step)
                their_state[key].add_(step.view_as(their_state[key]))
        # the original's ramp (engine_self_training.py), then its update
        theirs_ema.decay = cfg.ema_decay_init + (cfg.ema_decay - cfg.ema_decay_init) * min(1, it / cfg.ema_warm_steps)
        theirs_ema.update(theirs)
        ours.on_optimizer_step(it)
        assert ours.decay == pytest.approx(theirs_ema.decay)
    averaged, reference = ours.teacher.averages(), theirs_ema.ema.state_dict()
    assert len(mapping) > 10
    for name, key in mapping.items():
        assert torch.allclose(averaged[name], reference[key].view_as(averaged[name]), atol=1e-5), name
