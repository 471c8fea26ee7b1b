"""The backbone's masked-patch hook (MUST's mask token): with ``patch_mask`` the masked patches'
embeddings are the token, and nothing else changes; checked against open_clip's own forward with
those conv outputs replaced by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_backbone

TOL = 1e-5


def _case(bb, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, bb.image_size, bb.image_size, generator=g)
    side = bb.image_size // bb.model.visual.conv1.stride[0]
    mask = torch.rand(3, side * side, generator=g) < 0.4
    mask[0] = False  # an image with nothing masked
    token = torch.randn(bb.vision_width, generator=g)
    return images, mask, token, side


def _by_hand(bb, images, mask, token, side):
    """open_clip's forward, its conv1 output overwritten at the masked grid cells by the token."""
    v = bb.model.visual

    def replace(module, args, out):
        out = out.clone()
        for b, i in mask.nonzero().tolist():
            out[b, :, i // side, i % side] = token  # row-major: patch i is at (i // side, i % side)
        return out

    hook = v.conv1.register_forward_hook(replace)
    try:
        with torch.no_grad():
            return v(images)
    finally:
        hook.remove()


@pytest.mark.parametrize("fast", [True, False])
def test_masked_patches_equal_open_clip_with_the_token_put_in_by_hand(fast):
    bb = make_backbone(fast_blocks=fast)
    images, mask, token, side = _case(bb)
    with torch.no_grad():
        got = bb.encode_image(images, normalize=False, patch_mask=mask, mask_token=token)
        dense = bb.encode_image_dense(images, outputs=("pooled",), normalize=False, patch_mask=mask, mask_token=token)
        plain = bb.encode_image(images, normalize=False)
    ref = _by_hand(bb, images, mask, token, side)
    assert (got - ref).abs().max() <= TOL
    assert (dense.pooled - ref).abs().max() <= TOL
    # the unmasked image is untouched; the masked ones changed
    assert (got[0] - plain[0]).abs().max() <= TOL
    assert (got[1:] - plain[1:]).abs().amax(dim=-1).min() > 1e-3


def test_the_token_gets_the_gradient_of_the_rows_it_fills():
    bb = make_backbone()
    images, mask, token, _ = _case(bb)
    token = token.clone().requires_grad_(True)
    bb.encode_image(images, patch_mask=mask, mask_token=token).sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    token.grad = None
    bb.encode_image(images, patch_mask=torch.zeros_like(mask), mask_token=token).sum().backward()
    assert token.grad is None or token.grad.abs().sum() == 0


def test_a_mask_of_the_wrong_shape_is_one_message():
    bb = make_backbone()
    images, mask, token, _ = _case(bb)
    with pytest.raises(ValueError, match="one flag per patch of the grid"):
        bb.encode_image(images, patch_mask=mask[:, 1:], mask_token=token)
    with pytest.raises(ValueError, match="needs the mask_token"):
        bb.encode_image(images, patch_mask=mask)
    with pytest.raises(ValueError, match="wide"):
        bb.encode_image(images, patch_mask=mask, mask_token=token[1:])


def test_resnet_towers_refuse_the_mask_in_one_message():
    bb = make_backbone("test-rn")
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    with pytest.raises(TypeError, match="needs a ViT image tower"):
        bb.encode_image_dense(images, outputs=("pooled",), patch_mask=torch.zeros(2, 4, dtype=torch.bool),
                              mask_token=torch.zeros(8))


def test_normalized_output_is_the_normalized_raw_one():
    bb = make_backbone()
    images, mask, token, _ = _case(bb)
    with torch.no_grad():
        raw = bb.encode_image(images, normalize=False, patch_mask=mask, mask_token=token)
        unit = bb.encode_image(images, patch_mask=mask, mask_token=token)
    assert (unit - F.normalize(raw, dim=-1)).abs().max() <= TOL
