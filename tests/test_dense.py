"""Dense outputs of the towers: pooled outputs equal today's encoders, tokens and the value path
equal computations made with open_clip's own modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapt.backbone_ops import resample_positions
from tests.conftest import make_backbone

TOL = 1e-5


def _images(bb, n=3, scale=1):
    torch.manual_seed(1)
    return torch.randn(n, 3, bb.image_size * scale, bb.image_size * scale)


def _block_input(bb, images, index):
    """The input of image block ``index`` in open_clip's own forward."""
    seen = {}
    block = bb.model.visual.transformer.resblocks[index]
    hook = block.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        bb.model.encode_image(images)
    hook.remove()
    return seen["x"]


@pytest.mark.parametrize("name,fast", [("adapt-tiny-vit", True), ("adapt-tiny-vit", False), ("test-vit-wide", True)])
def test_pooled_and_tokens_equal_open_clip(name, fast):
    bb = make_backbone(name, fast_blocks=fast)
    images = _images(bb)
    v = bb.model.visual
    with torch.no_grad():
        dense = bb.encode_image_dense(images, outputs=("pooled", "tokens"))
        v.output_tokens = True  # open_clip's own tokens: ln_post of the last block's patch tokens
        ref_pooled, ref_tokens = v(images)
        v.output_tokens = False
    assert (dense.pooled - bb.encode_image(images)).abs().max() <= TOL
    assert (dense.pooled - F.normalize(ref_pooled, dim=-1)).abs().max() <= TOL
    side = bb.image_size // v.conv1.stride[0]
    assert dense.grid == (side, side) and dense.tokens.shape == (3, side * side, bb.embed_dim)
    assert (dense.tokens - F.normalize(ref_tokens @ v.proj, dim=-1)).abs().max() <= TOL
    # as a map: [B, C, h, w] with the row-major patch order of the grid
    assert torch.equal(dense.as_map("tokens")[:, :, 1, 2], dense.tokens[:, side + 2])


def test_value_path_is_the_last_block_with_self_only_attention():
    bb = make_backbone()
    images = _images(bb)
    v = bb.model.visual
    last = v.transformer.resblocks[-1]
    x = _block_input(bb, images, -1)
    n = x.shape[1]
    only_self = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        ref = v.ln_post(last(x, attn_mask=only_self))[:, 1:] @ v.proj
        dense = bb.encode_image_dense(images, outputs=("value",))
    assert dense.pooled is None and dense.tokens is None
    assert (dense.value - F.normalize(ref, dim=-1)).abs().max() <= TOL
    # and it is not the ordinary tokens (attention across tokens changes them)
    with torch.no_grad():
        tokens = bb.encode_image_dense(images, outputs=("tokens",)).tokens
    assert (dense.value - tokens).abs().max() > 1e-2


def test_value_only_skips_the_last_blocks_attention():
    bb = make_backbone()
    calls = []
    hook = bb.model.visual.transformer.resblocks[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        only = bb.encode_image_dense(_images(bb), outputs=("value",)).value
        both = bb.encode_image_dense(_images(bb), outputs=("value", "pooled")).value
    hook.remove()
    assert calls == [1] and torch.equal(only, both)


def test_block_taps_are_the_blocks_patch_tokens_as_maps():
    bb = make_backbone("tiny-vit-p4")
    images = _images(bb)
    blocks = bb.model.visual.transformer.resblocks
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, out)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        bb.model.encode_image(images)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        dense = bb.encode_image_dense(images, outputs=("pooled",), taps=(1, 3))
    side = dense.grid[0]
    assert sorted(dense.levels) == [1, 3] and side == 8
    for i in (1, 3):
        assert dense.levels[i].shape == (3, bb.vision_width, side, side)
        assert (dense.levels[i].flatten(2).transpose(1, 2) - seen[i][:, 1:]).abs().max() <= TOL


def test_prompt_hooks_apply_as_in_encode_image_forward_and_backward():
    bb = make_backbone()
    images = _images(bb, 2)
    torch.manual_seed(4)
    shallow = torch.randn(2, bb.vision_width, requires_grad=True)
    deep = [None] + [torch.randn(2, bb.vision_width, requires_grad=True) for _ in range(bb.vision_depth - 1)]
    ref = bb.encode_image(images, prompts=shallow, deep_prompts=deep)
    ref.pow(2).sum().backward()
    grads = [p.grad.clone() for p in [shallow, *deep[1:]]]
    for p in [shallow, *deep[1:]]:
        p.grad = None
    dense = bb.encode_image_dense(images, outputs=("pooled", "tokens"), prompts=shallow, deep_prompts=deep)
    assert (dense.pooled - ref).abs().max() <= TOL
    assert dense.tokens.shape[1] == dense.grid[0] * dense.grid[1]  # prompts are not patch tokens
    dense.pooled.pow(2).sum().backward()
    for g, p in zip(grads, [shallow, *deep[1:]]):
        assert (p.grad - g).abs().max() <= TOL
    # the prompts reach the tokens too
    with torch.no_grad():
        plain = bb.encode_image_dense(images, outputs=("tokens",)).tokens
    assert (plain - dense.tokens).abs().max() > 1e-3


def test_other_image_sizes_resample_the_positions():
    bb = make_backbone()
    big = _images(bb, 2, scale=2)
    with torch.no_grad():
        dense = bb.encode_image_dense(big, outputs=("tokens", "value"))
    side = 2 * bb.image_size // bb.model.visual.conv1.stride[0]
    assert dense.grid == (side, side) and dense.value.shape[1] == side * side
    with pytest.raises(ValueError, match="Resize the images to 32x32"):
        bb.encode_image(big, prompts=torch.zeros(1, bb.vision_width))
    # bicubic resampling keeps a constant embedding constant and the class position untouched
    pos = torch.cat([torch.full((1, 4), 7.0), torch.full((16, 4), 3.0)])
    out = resample_positions(pos, (6, 5))
    assert out.shape == (31, 4) and torch.equal(out[0], pos[0])
    assert (out[1:] - 3.0).abs().max() <= 1e-5
    assert resample_positions(pos, (4, 4)) is pos


def test_resnet_tower_outputs():
    bb = make_backbone("test-rn")
    images = _images(bb, 2)
    visual = bb.model.visual
    pool = visual.attnpool
    seen = {}
    hook = visual.layer4.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    with torch.no_grad():
        bb.model.encode_image(images)
        dense = bb.encode_image_dense(images, outputs=("pooled", "tokens", "value"), taps=(1, 3))
    hook.remove()
    x = seen["x"]
    assert (dense.pooled - bb.encode_image(images)).abs().max() <= TOL
    assert torch.equal(dense.levels[3], x) and dense.levels[1].shape[1] == visual.layer2[-1].conv3.out_channels
    seq = x.flatten(2).permute(2, 0, 1)
    value = pool.c_proj(pool.v_proj(seq)).permute(1, 0, 2)
    assert (dense.value - F.normalize(value, dim=-1)).abs().max() <= TOL
    # tokens: the pool's attention with every position as its query (nn.MultiheadAttention here)
    mha = nn.MultiheadAttention(seq.shape[-1], pool.num_heads)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        mha.out_proj.weight.copy_(torch.eye(seq.shape[-1]))  # c_proj changes the width: applied after
        mha.out_proj.bias.zero_()
        full = torch.cat([seq.mean(0, keepdim=True), seq]) + pool.positional_embedding[:, None]
        ref = pool.c_proj(mha(full, full, full, need_weights=False)[0][1:]).permute(1, 0, 2)
    assert (dense.tokens - F.normalize(ref, dim=-1)).abs().max() <= TOL
    with pytest.raises(TypeError, match="ViT image tower"):
        bb.encode_image_dense(images, prompts=torch.zeros(1, 8))


def test_bad_requests_are_named():
    bb = make_backbone()
    images = _images(bb, 1)
    with pytest.raises(ValueError, match=r"dense outputs \['patches'\]"):
        bb.encode_image_dense(images, outputs=("patches",))
    with pytest.raises(ValueError, match=r"block taps \[2\] .* use indices 0\.\.1"):
        bb.encode_image_dense(images, taps=(2,))


def test_text_token_outputs():
    bb = make_backbone()
    prompts = ["a photo of a dog.", "x", "a small red striped star on a grey background"]
    tokens = bb.tokenize(prompts)
    x = bb.embed_tokens(tokens)
    text = bb.text
    with torch.no_grad():
        dense = bb.encode_text_dense(x, tokens)
        length = dense.tokens.shape[1]
        # open_clip's own transformer over the same cut sequences
        h = text.transformer(x[:, :length] + text.positional_embedding[:length],
                             attn_mask=text.attn_mask[:length, :length])
        ref = F.normalize(text.ln_final(h) @ text.text_projection, dim=-1)
    eot = bb.eot_positions(tokens)
    assert length == int(eot.max()) + 1
    assert (dense.pooled - bb.encode_text(tokens)).abs().max() <= TOL
    assert (dense.tokens - ref).abs().max() <= TOL
    assert dense.mask.sum(1).tolist() == (eot + 1).tolist()
    assert not dense.mask[1, int(eot[1]) + 1:].any() and dense.mask[1, : int(eot[1]) + 1].all()
