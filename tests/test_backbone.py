"""The wrapper's encoders equal open_clip's own, and its loaders build real checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapt.backbone import BackboneConfig, build_backbone
from tests.conftest import make_backbone

PROMPTS = ["a photo of a dog.", "x", "a small red striped star on a grey background, drawn", "cat"]


@pytest.mark.parametrize("name", ["adapt-tiny-vit", "test-vit-wide"])
def test_encoders_equal_open_clip(name):
    bb = make_backbone(name)
    images = torch.randn(3, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(PROMPTS)
    with torch.no_grad():
        ref_txt = bb.model.encode_text(tokens, normalize=True)
        ref_img = bb.model.encode_image(images, normalize=True)
        # the hook path (prompt slots, block loop in the wrapper) with zero prompt tokens
        empty = torch.zeros(0, bb.vision_width)
        hooked_img = bb.encode_image(images, prompts=empty, deep_prompts=[empty] * bb.vision_depth)
        txt = bb.encode_text(tokens)
    assert (txt - ref_txt).abs().max() <= 1e-5
    assert (bb.encode_image(images) - ref_img).abs().max() <= 1e-5
    assert (hooked_img - ref_img).abs().max() <= 1e-5


def test_text_is_cut_to_the_longest_prompt(tiny_backbone):
    bb = tiny_backbone
    tokens = bb.tokenize(["a b c", "a photo of a red panda."])
    seen = []
    hook = bb.text.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        feats = bb.encode_text(tokens)
    hook.remove()
    longest = int(bb.eot_positions(tokens).max()) + 1
    assert seen == [longest] and longest < tokens.shape[1]
    with torch.no_grad():
        assert (feats - bb.model.encode_text(tokens, normalize=True)).abs().max() <= 1e-5


def test_chunked_and_checkpointed_text_equal_plain():
    plain = make_backbone()
    chunked = make_backbone(text_chunk_size=2, grad_checkpointing=True)
    tokens = plain.tokenize(PROMPTS)
    x1 = plain.embed_tokens(tokens).detach().requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    f1 = plain.encode_text_embeddings(x1, tokens)
    f2 = chunked.encode_text_embeddings(x2, tokens)
    f1.pow(2).sum().backward()
    f2.pow(2).sum().backward()
    assert (f1 - f2).abs().max() <= 1e-5
    assert (x1.grad - x2.grad).abs().max() <= 1e-5


def test_a_callable_deep_prompt_reads_the_tokens_entering_its_block_and_replaces_every_slot(tiny_backbone):
    """CAVPT's hook: a callable entry gets the image tokens (no prompt slots) entering block i and
    its tokens, of any count, take the place of all previous prompts; with the same tokens it is
    the static path."""
    bb, w = tiny_backbone, tiny_backbone.vision_width
    images, p0, p1 = torch.randn(2, 3, 32, 32), torch.randn(3, w), torch.randn(3, w)
    seen = []
    with torch.no_grad():
        static = bb.encode_image(images, prompts=p0, deep_prompts=[p0, p1])
        hooked = bb.encode_image(images, prompts=p0, deep_prompts=[p0, lambda x: seen.append(x) or p1])
        one = bb.encode_image(images, prompts=p0, deep_prompts=[p0, lambda x: p1[:1]])
        x, n, _ = bb._vit_embed(images, p0)
        x = bb._run_block(bb.model.visual.transformer.resblocks[0], x, None, bb.model.visual.transformer)
    assert torch.allclose(hooked, static, atol=1e-6)
    assert torch.allclose(seen[0], x[:, :n], atol=1e-6) and seen[0].shape[1] == n
    assert not torch.allclose(one, static, atol=1e-4)
    with torch.no_grad():  # one token from the callable = one static token at the last block
        x = bb._run_block(bb.model.visual.transformer.resblocks[1], torch.cat([x[:, :n], p1[:1].expand(2, -1, -1)], 1),
                          None, bb.model.visual.transformer)
        v = bb.model.visual
        expected = F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)
    assert torch.allclose(one, expected, atol=1e-5)


def test_resnet_tower_features_and_clear_prompt_error():
    bb = make_backbone("test-rn")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (bb.encode_image(images) - bb.model.encode_image(images, normalize=True)).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="ViT image tower"):
        bb.encode_image(images, prompts=torch.zeros(1, 8))


def test_backbone_stays_frozen_and_in_eval(tiny_backbone):
    tiny_backbone.train()
    assert not tiny_backbone.training and not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_local_checkpoint_file_loads_exact_weights(tmp_path):
    src = make_backbone(seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(src.model.state_dict(), path)
    loaded = build_backbone(BackboneConfig(name="adapt-tiny-vit", pretrained=str(path)))
    for (k, a), (_, b) in zip(src.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_openai_format_checkpoints(tmp_path, kind):
    """OpenAI's .pt files: fp16 TorchScript archives or plain fp16 state dicts, QuickGELU."""
    src = make_backbone("test-vit-openai", seed=5)
    model = src.model.half()
    path = tmp_path / "ViT-tiny.pt"
    if kind == "torchscript":
        torch.jit.script(model).save(str(path))
    else:
        torch.save(model.state_dict(), path)
    src.model.float()
    loaded = build_backbone(BackboneConfig(name="test-vit-openai", pretrained=str(path)))
    tokens = src.tokenize(PROMPTS)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded.encode_text(tokens) - src.encode_text(tokens)).abs().max() <= 1e-5
        assert (loaded.encode_image(images) - src.encode_image(images)).abs().max() <= 1e-5


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Did you mean"):
        build_backbone(BackboneConfig(name="ViT-B-61", pretrained=None))
    with pytest.raises(FileNotFoundError, match="checkpoint file .*missing.pt' not found"):
        build_backbone(BackboneConfig(name="adapt-tiny-vit", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(FileNotFoundError, match=r"neither a pretrained tag .*known tags: world\)"):
        build_backbone(BackboneConfig(name="tiny-vit-p4", pretrained="wrold"))
