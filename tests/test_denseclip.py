"""DenseCLIP (denseclip: frozen image tower; denseclip_ft: the original's fine-tuned one): the score
map at its neutral setting, the identity head's loss, what trains and at which lr, learning on
the world's label maps, the bad-input messages, and the engine's poly schedule."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from adapt.config import OptimConfig
from adapt.engine_optim import optimizer_groups, step_lr_factor
from adapt.methods import build_method
from adapt.methods.denseclip import default_taps
from adapt.structured import RecipeError
from tests.conftest import CLASSES, make_backbone

NAMES = CLASSES[:3]


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(seed=3)


def _method(backbone, name="denseclip", **config):
    torch.manual_seed(0)
    return build_method(name, config or None, backbone, NAMES, ["a photo of a {}."], task="segmentation")


def _hand_text(backbone, ctx: torch.Tensor) -> torch.Tensor:
    """[SOS] ctx_1..ctx_M <name> [EOS] through the text tower, unnormalised (no period)."""
    m = ctx.shape[0]
    tokens = backbone.tokenize([" ".join(["X"] * m) + f" {n}" for n in NAMES])
    emb = backbone.embed_tokens(tokens).clone()
    emb[:, 1:1 + m] = ctx
    return backbone.encode_text_embeddings(emb, tokens, normalize=False)


@pytest.mark.parametrize("neutral", ["gamma", "decoder"])
def test_neutral_score_map_is_the_cosine_map_of_the_frozen_tokens(backbone, neutral):
    """γ = 0, or a decoder whose output projection is zero: t' = t, so S is the plain cosine of
    the frozen final tokens with the context prompts' text features."""
    method = _method(backbone).eval()
    with torch.no_grad():
        if neutral == "gamma":
            method.gamma.zero_()
        else:
            method.gamma.fill_(1.0)
            for p in method.context_decoder.out_proj.parameters():
                p.zero_()
        images = torch.randn(2, 3, 32, 32)
        score = method.output(images).tensors["score_map"]
        dense = backbone.encode_image_dense(images, outputs=("tokens",), normalize=False)
        z = F.normalize(dense.tokens, dim=-1)  # [B, hw, C]
        t = F.normalize(_hand_text(backbone, method.prompts.ctx), dim=-1)
        hand = (z @ t.T).transpose(1, 2).reshape(2, len(NAMES), *dense.grid)
    assert torch.allclose(score, hand, atol=1e-5)
    # and the decoder moves it once it speaks: the neutral setting is what made them equal
    with torch.no_grad():
        method.gamma.fill_(1.0)
        method.context_decoder.out_proj[0].weight.fill_(1.0)
        torch.nn.init.normal_(method.context_decoder.out_proj[1].weight)
        assert not torch.allclose(method.output(images).tensors["score_map"], hand, atol=1e-3)


def test_loss_is_decode_ce_plus_0p4_identity_ce_at_tau(backbone):
    method = _method(backbone).train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    labels[:, :5] = 255
    out = method.output(images)
    loss = method.loss(out, labels)

    def ce(logits):  # pixel CE by hand: bilinear to the label map, mean over the kept pixels
        up = F.interpolate(logits.float(), size=(32, 32), mode="bilinear", align_corners=False)
        logp = up.log_softmax(1)
        keep = labels != 255
        picked = logp.gather(1, labels.clamp(max=2)[:, None])[:, 0]
        return -(picked[keep]).mean()

    s = out.tensors["score_map"]
    assert s.shape == (2, 3, 4, 4) and out.logits.shape == (2, 3, 16, 16)
    assert torch.allclose(out.scalars["aux_identity"], ce(s / 0.07), atol=1e-5)
    assert torch.allclose(loss, ce(out.logits) + 0.4 * ce(s / 0.07), atol=1e-5)


def _steps(method, n=2):
    cfg = OmegaConf.create({"lr": 1e-2, "weight_decay": 1e-4, "groups": {}})
    groups = optimizer_groups(method, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    method.train()
    for _ in range(n):
        labels = torch.randint(0, 3, (2, 32, 32))
        opt.zero_grad()
        method.loss(method.output(torch.randn(2, 3, 32, 32)), labels).backward()
        opt.step()
    return {g["name"]: g for g in groups}


def test_frozen_variant_keeps_every_backbone_tensor_and_the_fine_tune_moves_the_image_tower(backbone):
    frozen = _method(backbone)
    before = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    ctx = frozen.prompts.ctx.detach().clone()
    groups = _steps(frozen)
    assert set(groups) == {"params", "norms"} and groups["norms"]["weight_decay"] == 0.0
    after = frozen.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(ctx, frozen.prompts.ctx)  # the context does learn

    tuned = _method(backbone, "denseclip_ft")
    assert tuned.backbone is not backbone
    start = {k: v.clone() for k, v in tuned.backbone.state_dict().items()}
    groups = _steps(tuned)
    assert groups["backbone"]["lr"] == pytest.approx(0.1 * 1e-2) and groups["params"]["lr"] == 1e-2
    assert {id(p) for p in groups["backbone"]["params"]} >= {id(p) for p in tuned.levels.parameters()}
    end = tuned.backbone.state_dict()
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved and all(k.startswith("model.visual.") for k in moved)  # the text tower stays frozen
    assert set(tuned.backbone_state()) == {n for n, p in tuned.backbone.named_parameters() if p.requires_grad}
    shared = backbone.state_dict()
    assert all(torch.equal(before[k], shared[k]) for k in before)  # the given backbone never changes


def test_a_few_steps_on_the_world_label_maps_reduce_the_loss():
    """On world_seg_colour with the shipped tiny CLIP (frozen), 25 steps on one batch of label
    maps bring the loss well down (narrow neck and head to keep it fast)."""
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.data import DataConfig
    from adapt.data.registry import build_dataset
    from adapt.tasks import get_task

    bb = build_backbone(BackboneConfig(name="tiny-vit-p4", pretrained="world"))
    d = build_dataset(DataConfig(dataset="world_seg_colour", root=None))
    task = get_task("segmentation")
    tf = task.test_transform(32, bb.image_mean, bb.image_std)
    pairs = [task.read(Image.open(d.root / it.path).convert("RGB"), it.label, d.root, tf) for it in d.train[:8]]
    images, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    torch.manual_seed(0)
    method = build_method("denseclip", {"neck_channels": 32, "head_channels": 32}, bb, d.classnames,
                          d.templates, task="segmentation").train()
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = method.loss(method.output(images), labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0], losses


def test_taps_rule_and_bad_input(backbone):
    assert default_taps(12) == [3, 5, 7, 11] and default_taps(24) == [7, 11, 15, 23]
    assert default_taps(4) == [0, 1, 2, 3]
    # not segmentation data: the task-kind check refuses it
    with pytest.raises(ValueError, match="method 'denseclip' does segmentation"):
        build_method("denseclip", None, backbone, NAMES, ["a {}"], task="single_label")
    with pytest.raises(ValueError, match="method 'denseclip_ft' does segmentation"):
        build_method("denseclip_ft", None, backbone, NAMES, ["a {}"], task="single_label")
    # class names longer than the name context: one message naming them and the fix
    long = ["red", "a rather long class name", "another very long class name"]
    with pytest.raises(ValueError) as err:
        build_method("denseclip", None, backbone, long, ["a {}"], task="segmentation")
    msg = str(err.value)
    assert "2 class name(s) are longer" in msg and "'a rather long class name'" in msg
    assert "method.name_context_length=7" in msg
    with pytest.raises(ValueError, match="outside the image tower's 2 blocks"):
        _method(backbone, taps=[0, 1, 2, 5])


def test_recipe_pairing_denseclip_with_single_label_data_is_refused(image_folder, tmp_path):
    from adapt.config import load_recipe
    from adapt.run import run_fit
    from tests.conftest import tiny_overrides

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    over = tiny_overrides(image_folder, tmp_path, "denseclip", **{"data.image_size": "null",
                                                                 "data.reduce_zero_label": "null",
                                                                 "data.slide_window": "null"})
    with pytest.raises(ValueError, match="does segmentation"):
        run_fit(load_recipe(recipes / "denseclip" / "world.yaml", over))
    assert not any(tmp_path.rglob("results.json"))


def test_poly_schedule_is_mmcv_poly_with_a_multiplying_warm_up():
    f = step_lr_factor("poly", 2, 0.01, 10, 0.9)
    poly = lambda s: 0.01 + 0.99 * (1 - s / 10) ** 0.9  # noqa: E731
    assert f(0) == pytest.approx(poly(0) * 0.5) and f(1) == pytest.approx(poly(1))
    assert f(5) == pytest.approx(poly(5)) and f(10) == pytest.approx(0.01)
    with pytest.raises(RecipeError, match="optim.interval=step"):
        OptimConfig(scheduler="poly", interval="epoch")


# ------------------------------------------------------------------------------ parity --------
ORIGINAL = os.environ.get("ADAPT_DENSECLIP_REPO")


def _original_models():
    """The original's segmentation/denseclip/models.py with mmseg / timm stubbed."""
    import importlib.util

    stubs = {"timm": None, "timm.models": None, "timm.models.layers": None, "mmseg": None,
             "mmseg.models": None, "mmseg.models.builder": None, "mmseg.models.backbones": None}
    for name in stubs:
        sys.modules.setdefault(name, types.ModuleType(name))
    layers = sys.modules["timm.models.layers"]
    layers.drop = lambda *a, **k: None
    layers.drop_path = lambda x, p=0.0, training=False: x
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    builder = sys.modules["mmseg.models.builder"]
    builder.BACKBONES = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
    backbones = sys.modules["mmseg.models.backbones"]
    backbones.ResNet = backbones.VisionTransformer = torch.nn.Module
    path = Path(ORIGINAL) / "segmentation" / "denseclip" / "models.py"
    spec = importlib.util.spec_from_file_location("denseclip_original_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not ORIGINAL, reason="set ADAPT_DENSECLIP_REPO to a raoyongming/DenseCLIP checkout")
def test_parity_with_the_original_context_decoder_and_text_context_encoder():
    orig = _original_models()
    backbone = make_backbone(seed=3, quick_gelu=True)  # the original's blocks use QuickGELU
    method = _method(backbone).eval()
    # ContextDecoder: the same weights give the same Dec(t, V)
    dec = orig.ContextDecoder(transformer_width=256, transformer_heads=4, transformer_layers=3,
                              visual_dim=backbone.embed_dim, dropout=0.1).eval()
    ours = method.context_decoder
    mapping = dict(zip([n for n, _ in dec.named_parameters()], [p for _, p in ours.named_parameters()]))
    assert len(mapping) == len(list(ours.parameters()))
    with torch.no_grad():
        for n, p in dec.named_parameters():
            p.copy_(mapping[n])
        text, visual = torch.randn(2, 3, backbone.embed_dim), torch.randn(2, 17, backbone.embed_dim)
        assert torch.allclose(dec(text, visual), ours(text, visual), atol=1e-5)
    # CLIPTextContextEncoder with the tiny text tower's weights: the same t for the same context
    text_tower = backbone.model
    width = backbone.text_width
    enc = orig.CLIPTextContextEncoder(context_length=text_tower.positional_embedding.shape[0],
                                      transformer_width=width, transformer_heads=text_tower.transformer.resblocks[0].attn.num_heads,
                                      transformer_layers=len(text_tower.transformer.resblocks),
                                      embed_dim=backbone.embed_dim).eval()
    own = {"token_embedding.weight": text_tower.token_embedding.weight,
           "positional_embedding": text_tower.positional_embedding, "text_projection": text_tower.text_projection,
           "ln_final.weight": text_tower.ln_final.weight, "ln_final.bias": text_tower.ln_final.bias}
    own.update({"transformer." + k: v for k, v in text_tower.transformer.state_dict().items()})
    missing, unexpected = enc.load_state_dict({k: v for k, v in own.items()}, strict=False)
    assert not [m for m in missing if "attn_mask" not in m]
    n_ctx = method.prompts.n_ctx
    # the original tokenises the name alone ([SOS] name [EOS], padded) and inserts the context after SOS
    names = backbone.tokenize(NAMES)[:, :text_tower.positional_embedding.shape[0] - n_ctx]
    with torch.no_grad():
        theirs = enc(names, method.prompts.ctx[None])[0]
        assert torch.allclose(theirs, method.text_features(), atol=1e-4)
