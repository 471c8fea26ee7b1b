"""MaskDropout: nn.Dropout's distribution with a cheaper CPU mask, the mask shared by forward and
backward, and LoRA's dropouts replaced by it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adapt.fast_dropout import MaskDropout, keep_mask, use_mask_dropout


@pytest.mark.parametrize("p", [0.25, 0.1, 0.5])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_it_as_torch_does(p):
    drop = MaskDropout(p).train()
    torch.manual_seed(0)
    x = torch.full((1000, 1000), 2.0)
    y = drop(x)
    kept = y != 0
    n = x.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(kept.float().mean()) - (1 - p)) < 5 * sigma
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))
    # rows are not correlated: the kept fraction per row spreads as a binomial's
    per_row = kept.float().mean(1)
    assert float(per_row.std()) == pytest.approx((p * (1 - p) / 1000) ** 0.5, rel=0.15)


def test_backward_uses_the_forward_mask_and_a_bool_is_saved():
    drop = MaskDropout(0.25).train()
    x = torch.randn(64, 48, requires_grad=True)
    y = drop(x)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.bool and saved[0].shape == x.shape
    g = torch.randn_like(y)
    y.backward(g)
    mask = y.detach() != 0
    assert torch.allclose(x.grad, torch.where(mask, g / 0.75, torch.zeros_like(g)))


def test_eval_mode_and_p_zero_are_the_identity_and_seeds_repeat():
    x = torch.randn(32, 16)
    assert torch.equal(MaskDropout(0.25).eval()(x), x)
    assert torch.equal(MaskDropout(0.0).train()(x), x)
    assert torch.equal(MaskDropout(1.0).train()(x), torch.zeros_like(x))
    drop = MaskDropout(0.25).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)
    assert not torch.equal(drop(x), a)


def test_a_bf16_input_keeps_the_float32_keep_probability():
    torch.manual_seed(0)
    y = MaskDropout(0.3).train()(torch.ones(1000, 1000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert abs(float((y != 0).float().mean()) - 0.7) < 5 * (0.21 / 1e6) ** 0.5


def test_use_mask_dropout_replaces_plain_dropouts_only_and_keeps_their_mode():
    modules = nn.ModuleDict({"default": nn.Dropout(0.25).eval(), "other": nn.Identity()})
    assert use_mask_dropout(modules) == 1
    assert type(modules["default"]) is MaskDropout and modules["default"].p == 0.25
    assert not modules["default"].training and type(modules["other"]) is nn.Identity
    assert use_mask_dropout(modules) == 0


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.125, 0.9])  # 0.9: not a multiple of 2^-16, floats
def test_keep_mask_is_unbiased_in_every_lane_of_the_64_bit_draws(keep):
    # four elements share one 64-bit draw: a generator whose top bit is fixed (63-bit draws)
    # would keep every fourth element with probability 1 (or 1/2 - ...): each lane must match
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([2000, 1000]), keep)
    lanes = mask.view(-1, 4).float().mean(0)
    sigma = (keep * (1 - keep) / (mask.numel() / 4)) ** 0.5
    assert torch.all((lanes - keep).abs() < 5 * sigma), lanes
    # neighbours in a draw are independent: both kept with probability keep^2
    both = (mask.view(-1, 4)[:, 2] & mask.view(-1, 4)[:, 3]).float().mean()
    assert abs(float(both) - keep ** 2) < 5 * sigma
