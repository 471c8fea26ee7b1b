"""MUST: the EMA teacher and its ramp, the confidence threshold, the pseudo-label, fairness,
reconstruction and alignment terms against hand computations of the original's formulas, the
masks, the views, the layer-wise lr groups, and the teacher's place in the saved state."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adapt.methods import build_method
from adapt.methods.ema import EmaTeacher, ramped_decay
from adapt.methods.must import MUSTConfig, layer_of
from tests.conftest import CLASSES, make_backbone

NAMES = CLASSES[:4]


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


def _must(backbone, **config):
    torch.manual_seed(0)
    return build_method("must", config, backbone, NAMES, ["a photo of a {}."])


def _images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ EMA teacher ----------------
def test_the_decay_ramp_is_the_originals():
    # d_t = d0 + (0.9998 - d0) * min(1, t / warm_it), ImageNet's d0 0.999, warm_it 2000
    assert ramped_decay(0, 0.999, 0.9998, 2000) == 0.999
    assert ramped_decay(500, 0.999, 0.9998, 2000) == pytest.approx(0.999 + 0.0008 * 0.25, abs=1e-15)
    assert ramped_decay(2000, 0.999, 0.9998, 2000) == pytest.approx(0.9998, abs=1e-15)
    assert ramped_decay(5000, 0.999, 0.9998, 2000) == pytest.approx(0.9998, abs=1e-15)
    assert ramped_decay(7, 0.5, 0.9, 0) == 0.9


def test_the_teacher_is_the_hand_computed_ema_of_every_trainable_tensor(backbone):
    """After steps 0, 1, 2 with the ramp 0.5 → 0.9 over 2 steps: θ̄ ← d θ̄ + (1 − d) θ from θ̄ = θ₀."""
    m = _must(backbone, ema_decay_init=0.5, ema_decay=0.9, ema_warm_steps=2)
    live = m.live_tensors()
    assert set(m.teacher.names) == set(live) and {"classifier", "mask_token"} <= set(live)
    assert any(n.startswith("backbone.model.visual.") for n in live)
    by_hand = {n: t.detach().clone().double() for n, t in live.items()}
    g = torch.Generator().manual_seed(5)
    for step, decay in zip(range(3), (0.5, 0.7, 0.9)):
        with torch.no_grad():
            for t in live.values():
                t.add_(torch.randn(t.shape, generator=g))
        m.on_optimizer_step(step)
        assert m.decay == pytest.approx(decay)
        for n, t in live.items():
            by_hand[n] = decay * by_hand[n] + (1 - decay) * t.detach().double()
    averages = m.teacher.averages()
    for n in live:
        assert torch.allclose(averages[n].double(), by_hand[n], atol=1e-5), n
    # and the teacher's logits are the model run with those averages
    x = _images()
    with torch.no_grad():
        teacher = m.teacher_logits(x)
        saved = {n: t.detach().clone() for n, t in live.items()}
        for n, t in live.items():
            t.copy_(averages[n])
        assert torch.allclose(teacher, m.student_logits(x), atol=1e-5)
        for n, t in live.items():
            t.copy_(saved[n])
        assert not torch.allclose(teacher, m.student_logits(x), atol=1e-3)


def test_the_ema_update_breaks_on_a_wrong_decay():
    lin = torch.nn.Linear(2, 2)
    t = EmaTeacher(dict(lin.named_parameters()))
    with pytest.raises(ValueError, match="EMA decay"):
        t.update(dict(lin.named_parameters()), 1.5)


def test_the_teacher_is_saved_and_restored_with_the_student(backbone):
    m = _must(backbone)
    with torch.no_grad():
        m.classifier.add_(1.0)
    m.on_optimizer_step(0)
    state = m.trainable_state()
    assert "teacher.classifier" in state and any(k.startswith("teacher.backbone/model/visual/") for k in state)
    other = _must(backbone)
    other.load_trainable_state(state)
    assert torch.equal(other.teacher.averages()["classifier"], m.teacher.averages()["classifier"])
    assert torch.equal(other.classifier, m.classifier)


# ------------------------------------------------------------------ the loss terms -------------
def test_at_mask_ratio_0_with_the_teacher_equal_to_the_student_the_pseudo_label_loss_is_by_hand(backbone):
    m = _must(backbone, mask_ratio=0.0, conf_threshold=0.0, w_fair=0.0).train()
    x = _images()
    out = m.output(x)
    with torch.no_grad():
        f = F.normalize(backbone.encode_image(x, normalize=False), dim=-1)  # the untouched tower = θ₀
        text = F.normalize(torch.stack([backbone.encode_text(backbone.tokenize([f"a photo of a {c}."]))[0]
                                        for c in NAMES]), dim=-1)
        logits = backbone.logit_scale * f @ text.t()
    assert torch.allclose(out.logits, logits, atol=1e-4)
    pseudo = logits.argmax(-1)
    assert torch.equal(out.tensors["pseudo_labels"], pseudo)
    expected = -(logits.log_softmax(-1).gather(1, pseudo[:, None])).mean()
    loss = m.loss(out, torch.full((4,), -1))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert "mim" not in out.scalars and "align" not in out.scalars  # nothing masked: the --mask off path


def test_the_threshold_keeps_exactly_the_samples_above_it(backbone):
    m = _must(backbone, mask_ratio=0.0, w_fair=0.0, logit_scale=5.0).train()
    x = _images(8, seed=2)
    with torch.no_grad():
        probs = m.student_logits(x).softmax(-1)
    score = probs.max(-1).values.sort().values
    tau = float((score[3] + score[4]) / 2)  # four below, four above
    m.config.conf_threshold = tau
    out = m.output(x)
    keep = out.tensors["confident"]
    assert keep.sum() == 4 and torch.equal(keep, probs.max(-1).values > tau)
    pseudo = out.tensors["pseudo_labels"]
    expected = F.cross_entropy(out.logits[keep], pseudo[keep])
    assert m.loss(out, torch.full((8,), -1)).item() == pytest.approx(expected.item(), abs=1e-6)
    m.config.conf_threshold = 0.999  # no sample passes: 0, not the original's NaN
    out = m.output(x)
    assert not out.tensors["confident"].any() and m.loss(out, torch.full((8,), -1)).item() == 0.0


def test_fairness_is_minus_mean_log_of_the_mean_prediction(backbone):
    m = _must(backbone)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    assert m.fairness(logits).item() == pytest.approx(-logits.softmax(-1).mean(0).log().mean().item(), abs=1e-6)
    # from 512 classes: the mean with the last step's p̄ (detached), divided by 0.5, restarting per epoch
    m.config.fair_average_classes = 4
    m.train().on_train_epoch_start(0, 1)
    first, second = torch.randn(6, 4), torch.randn(6, 4)
    p1, p2 = first.softmax(-1).mean(0), second.softmax(-1).mean(0)
    assert m.fairness(first).item() == pytest.approx(-p1.log().mean().item() / 0.5, abs=1e-6)
    assert m.fairness(second).item() == pytest.approx(-(0.5 * (p1 + p2)).log().mean().item() / 0.5, abs=1e-6)
    m.on_train_epoch_start(1, 2)
    assert m.fairness(second).item() == pytest.approx(-p2.log().mean().item() / 0.5, abs=1e-6)


def test_reconstruction_and_alignment_are_the_originals_by_hand(backbone):
    m = _must(backbone, mask_ratio=0.5, mask_patch=16).train()  # 8-pixel patches: a 4 x 4 grid
    x = _images()
    torch.manual_seed(7)
    mask = m.draw_mask(x)
    torch.manual_seed(7)
    out = m.output(x)
    v, last = m.backbone.model.visual, m.backbone.vision_depth - 1
    with torch.no_grad():
        dense = m.backbone.encode_image_dense(x, outputs=("pooled",), taps=(last,), normalize=False,
                                              patch_mask=mask, mask_token=m.mask_token)
        z = m.ln_patch(dense.levels[last].flatten(2).transpose(1, 2))  # [B, 16, W]
        rec = m.decoder(z.transpose(1, 2).reshape(4, -1, 4, 4))
        # the original: mask [B, 4, 4] repeated 8x per axis, L1 on masked pixels / count / channels
        pix = mask.view(4, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].float()
        mim = ((rec - x).abs() * pix).sum() / pix.sum() / 3
        x_cls = F.normalize(dense.pooled, dim=-1)
        x_mask = F.normalize(z @ v.proj, dim=-1)
        per_patch = ((x_mask - x_cls[:, None]) ** 2).sum(-1)
        align = per_patch[mask].view(4, -1).mean()
    assert out.tensors["mim"].item() == pytest.approx(mim.item(), rel=1e-5)
    assert out.tensors["align"].item() == pytest.approx(align.item(), rel=1e-5)
    assert torch.allclose(out.logits, m.classify(dense.pooled), atol=1e-5)
    loss = m.loss(out, torch.full((4,), -1))
    cfg = m.config
    st_fair = out.scalars["st"] + cfg.w_fair * out.scalars["fair"]
    assert loss.item() == pytest.approx((st_fair + mim + cfg.w_align * align).item(), rel=1e-5)


def test_masks_are_whole_blocks_of_the_ratio():
    bb = make_backbone()
    m = _must(bb, mask_ratio=0.3, mask_patch=16)  # 32 px, 8-px patches: 2 x 2 blocks of 2 x 2 patches
    mask = m.draw_mask(_images(5)).view(5, 4, 4)
    blocks = mask.view(5, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(5, 4, 4)
    assert torch.equal(blocks.all(-1), blocks.any(-1))  # every block all in or all out
    assert (blocks.all(-1).sum(-1) == math.ceil(4 * 0.3)).all()
    with pytest.raises(ValueError, match="mask_patch=12 must divide"):
        _must(bb, mask_patch=12)
    with pytest.raises(ValueError, match="multiple of"):
        _must(bb, mask_patch=4)


def test_the_training_views_are_a_weak_and_a_strong_view(backbone):
    m = _must(backbone)
    views = m.train_transform(32, backbone.image_mean, backbone.image_std)
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())
    out = views(image)
    assert out.shape == (2, 3, 32, 32) and not torch.equal(out[0], out[1])
    # output(): teacher on view 0, student on view 1
    m.config.mask_ratio = 0.0
    m.train()
    pair = torch.stack([_images(2, 1), _images(2, 2)], dim=1)
    out = m.output(pair)
    with torch.no_grad():
        assert torch.allclose(out.logits, m.student_logits(pair[:, 1]), atol=1e-5)
        assert torch.equal(out.tensors["pseudo_labels"], m.teacher_logits(pair[:, 0]).argmax(-1))


def test_the_data_module_serves_the_methods_views(image_folder, backbone):
    from adapt.data import DataConfig
    from adapt.datamodule import AdaptDataModule

    dm = AdaptDataModule(DataConfig(dataset="imagefolder", root=str(image_folder), setting="unsupervised", shots=0,
                                    batch_size=4, num_workers=0), 32, backbone.image_mean, backbone.image_std, seed=1)
    dm.setup()
    dm.serve(_must(backbone), backbone, cache=True)
    x, y = next(iter(dm.train_dataloader(world_size=1, rank=0)))
    assert x.shape == (4, 2, 3, 32, 32) and (y == -1).all()


# ------------------------------------------------------------------ optimisation ---------------
def test_layer_decay_groups_follow_the_originals_layer_ids(backbone):
    depth = backbone.vision_depth
    assert layer_of("backbone.model.visual.conv1.weight", depth) == 0
    assert layer_of("backbone.model.visual.positional_embedding", depth) == 0
    assert layer_of("mask_token", depth) == 0
    assert layer_of("backbone.model.visual.transformer.resblocks.1.mlp.c_fc.weight", depth) == 2
    assert layer_of("backbone.model.visual.ln_post.weight", depth) == depth + 1
    assert layer_of("classifier", depth) == depth + 1
    m = _must(backbone)
    groups = m.param_groups()
    where = {id(p): name for name, g in groups.items() for p in g.params}
    params = dict(m.named_parameters())
    top = groups[where[id(m.classifier)]]
    assert top.lr_scale == 1.0 and top.weight_decay_scale == 1.0
    conv = groups[where[id(params["backbone.model.visual.conv1.weight"])]]
    assert conv.lr_scale == pytest.approx(0.65 ** (depth + 1))
    bias = groups[where[id(params["backbone.model.visual.transformer.resblocks.0.attn.in_proj_bias"])]]
    assert bias.lr_scale == pytest.approx(0.65 ** depth) and bias.weight_decay_scale == 0.0
    token = groups[where[id(m.mask_token)]]  # [1, 1, W] there: weight decay on
    assert token.lr_scale == pytest.approx(0.65 ** (depth + 1)) and token.weight_decay_scale == 1.0


def test_the_lora_variant_trains_image_tower_factors_and_starts_as_must(backbone):
    full, lora = _must(backbone), build_method("must_lora", None, backbone, NAMES, ["a photo of a {}."])
    owned = set(lora.backbone_state())
    assert owned and all(".lora_" in n and n.startswith("model.visual.") for n in owned)
    assert {n for n, p in lora.backbone.named_parameters() if p.requires_grad} == owned
    assert set(lora.teacher.names) == set(lora.live_tensors()) >= {"backbone." + n for n in owned}
    x = _images(3)
    with torch.no_grad():  # B = 0 at the start: the zero-shot-initialised model, as must
        assert torch.allclose(lora.eval()(x), full.eval()(x), atol=1e-5)
    with pytest.raises(ValueError, match="dropout 0"):
        build_method("must_lora", {"dropout": 0.25}, backbone, NAMES, ["a photo of a {}."])


def test_defaults_are_the_originals_imagenet_vit_b16_config():
    cfg = MUSTConfig()
    assert (cfg.conf_threshold, cfg.mask_ratio, cfg.mask_patch, cfg.w_align, cfg.w_fair) == (0.7, 0.3, 32, 0.2, 1.0)
    assert (cfg.ema_decay_init, cfg.ema_decay, cfg.ema_warm_steps, cfg.layer_decay) == (0.999, 0.9998, 2000, 0.65)
    assert cfg.strong_crop_scale == [0.3, 1.0]


def test_a_resnet_tower_is_refused_in_one_message():
    with pytest.raises(TypeError, match="needs a ViT image tower"):
        build_method("must", None, make_backbone("test-rn"), NAMES, ["a photo of a {}."])


# ------------------------------------------------------------------ checkpoint and resume ------
def _must_args(image_folder, tmp_path, run_name):
    from tests.conftest import tiny_overrides

    root = Path(__file__).resolve().parents[1]
    return ["fit", str(root / "recipes/must/imagenet.yaml"), *tiny_overrides(image_folder, tmp_path, "must", **{
        "run_name": run_name, "data.setting": "unsupervised", "data.shots": 0, "baseline": "false",
        "trainer.max_epochs": 12, "trainer.checkpoint_every_n_epochs": 3, "method.mask_patch": 16,
        "method.ema_decay_init": 0.5, "method.ema_warm_steps": 40, "method.conf_threshold": 0.2,
        "optim.lr": 0.001, "optim.min_lr": 0.0})]


def test_a_killed_run_resumes_to_the_uninterrupted_teacher_and_student(image_folder, tmp_path):
    """SIGKILL after the first checkpoint, then ``resume=true``: the adapter (student, teacher)
    has the bytes of the uninterrupted run, so the EMA, its ramp and the masks all resumed."""
    import signal

    from tests.test_reliability import ADAPTER, _interrupt_after_first_checkpoint, _run

    ref = _run(_must_args(image_folder, tmp_path, "ref"), tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    killed = _interrupt_after_first_checkpoint(_must_args(image_folder, tmp_path, "killed"), tmp_path, run,
                                               signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    done = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["loops"]["fit_loop"]["epoch_progress"]
    assert 0 < done["current"]["processed"] < 12  # stopped midway
    resumed = _run(_must_args(image_folder, tmp_path, "killed") + ["resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from safetensors.torch import load_file

    ours = load_file(run / ADAPTER)
    # the teacher lags the student (a stale or reset EMA would make other bytes below)
    assert not torch.equal(ours["teacher.backbone/model/visual/conv1/weight"], ours["backbone.model.visual.conv1.weight"])
    assert (run / ADAPTER).read_bytes() == (tmp_path / "ref" / ADAPTER).read_bytes()


def test_bad_settings_are_one_message_each():
    for bad, match in (({"conf_threshold": 1.0}, "conf_threshold and mask_ratio"),
                       ({"mask_ratio": -0.1}, "conf_threshold and mask_ratio"),
                       ({"ema_decay": 1.5}, "ema_decay_init and ema_decay"),
                       ({"layer_decay": 0.0}, "layer_decay in"),
                       ({"randaugment_magnitude": 11}, "randaugment_magnitude"),
                       ({"predict_with": "both"}, "student or teacher"),
                       ({"strong_crop_scale": [0.5, 0.2]}, "crop_scale")):
        with pytest.raises(ValueError, match=match):
            MUSTConfig(**bad)


def test_predict_with_teacher_reads_the_ema(backbone):
    m = _must(backbone, predict_with="teacher").eval()
    with torch.no_grad():
        m.classifier.add_(torch.randn_like(m.classifier))  # the student moves, the EMA not yet
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(m(x), m.teacher_logits(x)) and not torch.allclose(m(x), m.student_logits(x))
