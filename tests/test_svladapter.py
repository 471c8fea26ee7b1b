"""SVL-Adapter (adapt/methods/svladapter.py) and its SimCLR stage (adapt/methods/simclr.py)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import adapt.methods.simclr as simclr
from adapt.config import RecipeError, load_recipe
from adapt.data import DataConfig
from adapt.datamodule import AdaptDataModule
from adapt.methods import build_method
from adapt.methods.svladapter import confidence_weight, fuse
from tests.conftest import CLASSES, write_image_folder

FAST = {"ssl_arch": "resnet_small", "ssl_epochs": 1, "ssl_image_size": 16, "ssl_feature_size": None,
        "ssl_batch_size": 64}
TEMPLATES = ["a photo of a {}."]


def _dm(root, backbone, cache_dir=None, **kw):
    kw = {"shots": 4, **kw}
    dm = AdaptDataModule(DataConfig(dataset="imagefolder", root=str(root), batch_size=8, num_workers=0,
                                    cache_dir=None if cache_dir is None else str(cache_dir), **kw),
                         backbone.image_size, backbone.image_mean, backbone.image_std, seed=1)
    dm.setup()
    return dm


def _method(backbone, **over):
    return build_method("svladapter", {**FAST, **over}, backbone, CLASSES, TEMPLATES)


def test_nt_xent_equals_a_hand_computation():
    z1 = torch.tensor([[1.0, 0.0, 0.5], [0.2, 1.0, -0.3]])
    z2 = torch.tensor([[0.9, 0.1, 0.4], [-0.5, 0.8, 0.1]])
    tau = 0.5
    z = [[c / math.sqrt(sum(c * c for c in v)) for c in v] for v in (z1.tolist() + z2.tolist())]
    total = 0.0
    for i in range(4):
        pos = (i + 2) % 4
        sims = {j: sum(a * b for a, b in zip(z[i], z[j])) / tau for j in range(4) if j != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    assert simclr.nt_xent(z1, z2, tau).item() == pytest.approx(total / 4, rel=1e-6)
    with pytest.raises(ValueError, match="B >= 2"):
        simclr.nt_xent(z1[:1], z2[:1], tau)


def test_at_fusion_weight_zero_the_logits_are_zero_shot_exactly(tiny_backbone):
    images = torch.randn(3, 3, 32, 32)
    zeroshot = build_method("zeroshot", None, tiny_backbone, CLASSES, TEMPLATES).eval()
    clip_only = _method(tiny_backbone, fusion="0", clip_logit_scale=None).eval()
    with torch.no_grad():
        assert torch.equal(clip_only(images), zeroshot(images))
        # the original's 100·cos, and the fused formula between the ends
        hundred = _method(tiny_backbone, fusion="0.3").eval()
        f = hundred.image_features_of(images)
        zs = 100.0 * f @ hundred.text_features.t()
        expected = 0.3 * hundred.adapter_logits(images) + 0.7 * zs
        assert torch.allclose(hundred(images), expected, atol=1e-5)
        hundred.set_alpha(0.0)
        assert torch.equal(hundred(images), zs)


def test_the_confidence_rule_equals_a_hand_computation(tiny_backbone, image_folder, tmp_path):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    top = [math.exp(2) / (math.exp(2) + 1 + math.exp(-1)), 1 / 3]
    assert confidence_weight(logits) == pytest.approx(1 - sum(top) / 2, rel=1e-6)
    # in setup: λ from the test images' zero-shot confidence (transductive), no labels read
    dm = _dm(image_folder, tiny_backbone, tmp_path / "cache")
    method = _method(tiny_backbone, fusion="confidence", ssl_epochs=0)
    method.setup(dm)
    items = dm.eval_sets["test"][1]
    x = torch.stack([dm.dataloader(items, dm.test_transform(), 8).dataset[i][0] for i in range(len(items))])
    with torch.no_grad():
        f = F.normalize(tiny_backbone.encode_image(x, normalize=False), dim=-1)
        p = (100.0 * f @ method.text_features.t()).softmax(-1)
    assert float(method.alpha) == pytest.approx(1 - float(p.max(-1).values.mean()), abs=1e-5)
    assert fuse(torch.ones(1, 2), torch.zeros(1, 2), 0.25).tolist() == [[0.25, 0.25]]


def test_the_pretrained_encoder_is_cached_and_invalidated_when_the_data_changes(tiny_backbone, image_folder,
                                                                               tmp_path):
    root = shutil.copytree(image_folder, tmp_path / "images")
    dm = _dm(root, tiny_backbone, tmp_path / "cache")
    fast = {"ssl_epochs": 0}  # what is trained does not matter here, only whether it is
    first = _method(tiny_backbone, **fast)
    runs = simclr.PRETRAIN_RUNS["count"]
    first.setup(dm)
    assert simclr.PRETRAIN_RUNS["count"] == runs + 1 and first.ssl_report["cache"] == "trained"
    torch.manual_seed(123)  # another run's random state: the same (loaded) encoder
    second = _method(tiny_backbone, **fast)
    second.setup(_dm(root, tiny_backbone, tmp_path / "cache"))
    assert simclr.PRETRAIN_RUNS["count"] == runs + 1 and second.ssl_report["cache"] == "hit"
    for a, b in zip(first.ssl_encoder.state_dict().values(), second.ssl_encoder.state_dict().values()):
        assert torch.equal(a, b)
    # another SimCLR config: another entry
    _method(tiny_backbone, ssl_temperature=0.2, **fast).setup(dm)
    assert simclr.PRETRAIN_RUNS["count"] == runs + 2
    # an image rewritten under the same name: the data changed, the encoder is trained again
    victim = sorted((root / "train" / CLASSES[0]).glob("*.png"))[0]
    shutil.copyfile(sorted((root / "train" / CLASSES[1]).glob("*.png"))[0], victim)
    third = _method(tiny_backbone, **fast)
    third.setup(_dm(root, tiny_backbone, tmp_path / "cache"))
    assert simclr.PRETRAIN_RUNS["count"] == runs + 3 and third.ssl_report["cache"] == "trained"


def test_a_few_world_steps_reduce_the_ssl_loss():
    from adapt.data.items import Item
    from adapt.data.registry import build_dataset

    world = build_dataset(DataConfig(dataset="world_colour"))
    items = [Item(it.path, -1) for it in world.train[:32]]
    cfg = simclr.SimCLRConfig(arch="resnet_small", epochs=3, batch_size=16, image_size=16, lr_mult=0.5)
    losses = simclr.pretrain(simclr.SimCLRModel(cfg), items, world.root, cfg, "cpu")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses


def test_the_encoder_stays_frozen_in_training_and_is_saved(tiny_backbone):
    method = _method(tiny_backbone).train()
    assert method.head.training and not method.ssl_encoder.training
    assert not any(p.requires_grad for p in method.ssl_encoder.parameters())
    state = method.trainable_state()
    assert {"ssl_encoder." + k for k in method.ssl_encoder.state_dict()} <= set(state)


def test_bad_inputs_give_one_message_each(tiny_backbone, image_folder, tmp_path):
    recipe = "recipes/svladapter/world.yaml"
    for value in ("abc", "1.5"):
        with pytest.raises(RecipeError, match="method.fusion=.*validation.*confidence.*weight"):
            load_recipe(recipe, [f"method.fusion={value}"])
    with pytest.raises(RecipeError, match="method.ssl_arch='vgg'.*resnet50"):
        load_recipe(recipe, ["method.ssl_arch=vgg"])
    with pytest.raises(RecipeError, match="method.ssl_weights=.*no such file"):
        load_recipe(recipe, [f"method.ssl_weights={tmp_path / 'none.pth'}"])
    # validation fusion without validation images (unsupervised data has none)
    dm = _dm(image_folder, tiny_backbone, tmp_path / "cache", setting="unsupervised", shots=2)
    with pytest.raises(ValueError, match="fusion=validation.*has none.*fusion=confidence"):
        _method(tiny_backbone, fusion="validation").setup(dm)
    # no unlabelled images to pretrain on
    lonely = write_image_folder(tmp_path / "lonely", classes=CLASSES[:1], per_split={"train": 1, "test": 1})
    dm = _dm(lonely, tiny_backbone, tmp_path / "cache", shots=0)
    with pytest.raises(ValueError, match="unlabelled images, but the data gives 1: give data.unlabelled.folder"):
        _method(tiny_backbone, fusion="0.2").setup(dm)
