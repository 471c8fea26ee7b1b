"""Contract every registered method must honour (the loop picks up new methods automatically)."""
from __future__ import annotations

import pytest
import torch

from adapt.export import load_adapter, save_adapter
from adapt.methods import build_method, list_methods
from tests.conftest import CLASSES

NAMES = CLASSES[:4]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _build(name, backbone, datamodule):
    torch.manual_seed(0)
    method = build_method(name, None, backbone, NAMES, TEMPLATES)
    method.setup(datamodule)
    return method


@pytest.mark.parametrize("name", list_methods())
def test_logits_are_finite_and_shaped(name, tiny_backbone, tiny_datamodule):
    method = _build(name, tiny_backbone, tiny_datamodule).eval()
    images = torch.randn(3, 3, 32, 32)
    logits = method.predict(images)
    assert logits.shape == (3, len(NAMES))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_methods())
def test_only_method_parameters_train(name, tiny_backbone, tiny_datamodule):
    method = _build(name, tiny_backbone, tiny_datamodule)
    assert not any(p.requires_grad for p in method.backbone.parameters())
    if not method.is_trainable:
        pytest.skip(f"{name} has no trainable parameters")
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(method.trainable_parameters(), lr=1.0)
    method.loss(method(images), labels).backward()
    opt.step()
    after = method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "one optimizer step changed nothing"
    assert changed <= trainable, f"frozen state changed: {sorted(changed - trainable)}"


@pytest.mark.parametrize("name", list_methods())
def test_export_then_load_gives_identical_logits(name, tiny_backbone, tiny_datamodule, tmp_path):
    method = _build(name, tiny_backbone, tiny_datamodule)
    with torch.no_grad():  # move the trainable state away from its initialisation
        for p in method.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(method, tmp_path)
    loaded = load_adapter(tmp_path, backbone=tiny_backbone)
    images = torch.randn(3, 3, 32, 32)
    method.eval(), loaded.eval()
    assert torch.allclose(method.predict(images), loaded.predict(images), atol=1e-6)
