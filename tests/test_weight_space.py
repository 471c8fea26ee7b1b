"""Weight-space methods: the exact attention split, peft injection, their own backbone, WiSE-FT's
mixing and validation-only choice of alpha, peft interop from the README, and the world."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapt.config import load_recipe
from adapt.export import AdapterError, load_adapter, save_adapter
from adapt.fast_dropout import MaskDropout
from adapt.methods import build_method
from adapt.methods.wiseft import WiSEFT
from adapt.run import run_fit
from adapt.split_attention import SplitAttention, split_attention
from tests.conftest import CLASSES, make_backbone, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
WEIGHTS = ROOT / "adapt" / "weights" / "tiny-vit-p4-world.safetensors"
NAMES = CLASSES[:4]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
TUNERS = ["lora", "dora", "lntuning", "bitfit"]


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _perturb(method, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(scale * torch.randn_like(p))


# ------------------------------------------------------------------ the attention split ---------
@pytest.mark.parametrize("tower", ["text", "image"])
def test_split_attention_equals_multihead_attention(tiny_backbone, tower):
    blocks = tiny_backbone.blocks(tower)
    length = 9 if tower == "text" else 17
    x = torch.randn(2, length, tiny_backbone.text_width if tower == "text" else tiny_backbone.vision_width)
    causal = tiny_backbone.text.attn_mask[:length, :length]
    masks = [None, causal, causal == float("-inf")]  # none, the causal float mask, a boolean one
    for _, block in blocks:
        split = copy.deepcopy(block)
        assert split_attention([split]) == 1 and isinstance(split.attn, SplitAttention)
        for mask in masks:
            with torch.no_grad():
                want = block(x, attn_mask=mask)
                got = split(x, attn_mask=mask)
            assert (got - want).abs().max() <= 1e-5, (tower, None if mask is None else mask.dtype)
        # the fused weights really are split (not shared), and the copy leaves the original alone
        assert split.attn.q_proj.weight.data_ptr() != block.attn.in_proj_weight.data_ptr()


def test_split_towers_encode_as_before(tiny_backbone):
    split = tiny_backbone.clone()
    for tower in ("text", "image"):
        split_attention(b for _, b in split.blocks(tower))
    tokens = tiny_backbone.tokenize(["a photo of a red.", "a drawing of a cyan dog."])
    images = _images()
    with torch.no_grad():
        assert (split.encode_text(tokens) - tiny_backbone.encode_text(tokens)).abs().max() <= 1e-5
        assert (split.encode_image(images) - tiny_backbone.encode_image(images)).abs().max() <= 1e-5
    assert isinstance(tiny_backbone.blocks("text")[0][1].attn, nn.MultiheadAttention)  # original untouched


# ------------------------------------------------------------------ injection -------------------
@pytest.mark.parametrize("name", TUNERS)
def test_before_training_the_tuned_model_equals_the_frozen_one(name, tiny_backbone):
    method = build_method(name, {"logit_scale": None, "templates": TEMPLATES[:1]}, tiny_backbone, NAMES, TEMPLATES)
    frozen = build_method("zeroshot", {"templates": TEMPLATES[:1]}, tiny_backbone, NAMES, TEMPLATES)
    method.eval()
    with torch.no_grad():
        assert (method.predict(_images()) - frozen.predict(_images())).abs().max() <= 1e-4


@pytest.mark.parametrize("config, expected", [
    ({}, 2 * 2 * 3),  # both towers x 2 blocks x q, k, v
    ({"towers": ["image"], "targets": ["q", "o"], "layers": [-1]}, 1 * 1 * 2),
    ({"towers": ["text"], "targets": ["v"], "layers": [0, -1]}, 1 * 2 * 1),
])
def test_lora_adapts_towers_x_layers_x_targets(tiny_backbone, config, expected):
    from peft.tuners.lora import LoraLayer

    method = build_method("lora", config, tiny_backbone, NAMES, TEMPLATES)
    layers = {n: m for n, m in method.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == expected
    want = 0
    for layer in layers.values():
        base = layer.get_base_layer()
        want += 2 * (base.in_features + base.out_features)  # r = 2: A [2, in] + B [out, 2]
        assert layer.scaling["default"] == pytest.approx(1.0 / 2 ** 0.5)  # CLIP-LoRA's alpha/sqrt(r)
    trainable = sum(p.numel() for p in method.trainable_parameters())
    assert trainable == want == sum(t.numel() for t in method.backbone_state().values())


def test_lora_scaling_without_rslora_is_alpha_over_r(tiny_backbone):
    method = build_method("lora", {"rslora": False, "r": 4, "alpha": 2.0}, tiny_backbone, NAMES, TEMPLATES)
    scalings = {m.scaling["default"] for m in method.backbone.modules() if hasattr(m, "scaling")}
    assert scalings == {0.5}


def test_lora_dropout_follows_the_method_mode(tiny_backbone):
    method = build_method("lora", None, tiny_backbone, NAMES, TEMPLATES)
    dropouts = method.mode_modules()
    assert dropouts and all(isinstance(d["default"], nn.Dropout) for d in dropouts)
    assert all(type(d["default"]) is MaskDropout and d["default"].p == 0.25 for d in dropouts)
    method.train()
    assert all(d.training for d in dropouts) and not method.backbone.model.training
    images = _images()
    with torch.no_grad():
        _perturb(method)  # B != 0, so dropout on the LoRA branch changes the output
        a, b = method(images), method(images)
        assert not torch.equal(a, b)
        method.eval()
        assert not any(d.training for d in dropouts)
        assert torch.equal(method(images), method(images))


def test_lora_uses_the_fixed_logit_scale(tiny_backbone):
    hundred = build_method("lora", None, tiny_backbone, NAMES, TEMPLATES).eval()
    model = build_method("lora", {"logit_scale": None}, tiny_backbone, NAMES, TEMPLATES).eval()
    with torch.no_grad():
        ratio = hundred.predict(_images()) / model.predict(_images())
    assert torch.allclose(ratio, torch.full_like(ratio, 100.0 / float(tiny_backbone.logit_scale)), rtol=1e-4)


@pytest.mark.parametrize("name", TUNERS + ["wiseft"])
def test_adapter_loads_onto_a_freshly_built_backbone(name, tiny_backbone, tmp_path):
    method = build_method(name, None, tiny_backbone, NAMES, TEMPLATES)
    _perturb(method)
    save_adapter(method, tmp_path)
    fresh = make_backbone()  # another object, same weights
    loaded = load_adapter(tmp_path, backbone=fresh)
    method.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(method.predict(_images()), loaded.predict(_images()))
    assert not any(p.requires_grad for p in fresh.parameters())  # the fresh backbone itself: frozen


def test_adapter_refuses_another_backbone_with_both_names(tiny_backbone, tmp_path):
    method = build_method("lora", None, tiny_backbone, NAMES, TEMPLATES)
    save_adapter(method, tmp_path)
    other = make_backbone("test-vit-openai")
    with pytest.raises(AdapterError, match="adapt-tiny-vit.*test-vit-openai"):
        load_adapter(tmp_path, backbone=other)


def test_zero_shot_baseline_after_a_lora_fit_equals_a_separate_zero_shot_run(image_folder, tmp_path):
    lora = run_fit(load_recipe(RECIPES / "lora/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, "lora", **{"trainer.max_steps": 3, "baseline": "true", "run_name": "lora",
                                            "method.logit_scale": "null"})))
    zs = run_fit(load_recipe(RECIPES / "zeroshot/fewshot.yaml" if (RECIPES / "zeroshot/fewshot.yaml").is_file()
                             else RECIPES / "coop/fewshot.yaml",
                             tiny_overrides(image_folder, tmp_path, "zeroshot", run_name="zs")))
    assert lora["zeroshot_metrics"] == zs["metrics"]
    # towers x blocks x targets x r (in + out): the tiny model has 2 blocks of width 64 per tower
    assert lora["trainable_params"] == 2 * 2 * 3 * 2 * (64 + 64)


def test_a_lora_fit_leaves_the_experiment_backbone_zero_shot(image_folder, tmp_path):
    """Logit-level: after LoRA trains, the zero-shot model the runner builds on the experiment's
    backbone (the baseline) gives exactly the logits it gave before training."""
    from adapt.run import Experiment

    exp = Experiment(load_recipe(RECIPES / "lora/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, "lora", **{"trainer.max_steps": 3, "run_name": "l", "optim.lr": 0.05,
                                            "method.logit_scale": "null"})))
    images = _images()

    def zero_shot():
        return build_method("zeroshot", None, exp.backbone, exp.data.train_classnames, exp.data.templates).eval()

    with torch.no_grad():
        before = zero_shot().predict(images)
        assert (exp.method.eval().predict(images) - before).abs().max() <= 1e-5  # B = 0 at the start
    exp.fit()
    exp.method.eval()
    with torch.no_grad():
        assert torch.equal(zero_shot().predict(images), before)
        assert (exp.method.predict(images) - before).abs().max() > 1e-3  # the LoRA did train


# ------------------------------------------------------------------ peft interop ----------------
def test_readme_peft_snippet_reapplies_a_lora_adapter(tiny_backbone, tmp_path, monkeypatch):
    """The README's lines (torch, open_clip, peft, safetensors only) give adapt's LoRA logits."""
    import open_clip

    method = build_method("lora", None, tiny_backbone, NAMES, TEMPLATES)
    _perturb(method)
    save_adapter(method, tmp_path / "my_adapter")
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- peft-snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: (copy.deepcopy(tiny_backbone.model), None, None))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    images = _images()
    tokens = tiny_backbone.tokenize([TEMPLATES[0].format(c) for c in NAMES])
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        method.eval()
        assert (100 * img @ txt.t() - method.predict(images)).abs().max() <= 1e-4
    config = json.loads((tmp_path / "my_adapter/peft/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] and config["r"] == 2


# ------------------------------------------------------------------ WiSE-FT ---------------------
def test_wiseft_alpha_zero_is_zero_shot_and_one_the_fine_tuned_model(tiny_backbone):
    method = build_method("wiseft", None, tiny_backbone, NAMES, TEMPLATES).eval()
    zero_shot = build_method("zeroshot", {"ensemble": True}, tiny_backbone, NAMES, TEMPLATES).eval()
    images = _images()
    with torch.no_grad():
        assert (method.predict(images) - zero_shot.predict(images)).abs().max() <= 1e-4
        _perturb(method)
        tuned = method.predict(images)
        assert (tuned - zero_shot.predict(images)).abs().max() > 1e-2
        method.set_alpha(0.0)
        assert (method.predict(images) - zero_shot.predict(images)).abs().max() <= 1e-4
        method.set_alpha(0.5)
        half = method.predict(images)
        method.set_alpha(1.0)
        assert torch.equal(method.predict(images), tuned)
    assert not torch.allclose(half, tuned) and float(method.alpha) == 1.0
    # novel classes get their zero-shot rows: at alpha = 0 every class is zero-shot CLIP
    method.set_alpha(0.0)
    method.set_classnames([NAMES[1], CLASSES[5]])
    zero_shot.set_classnames([NAMES[1], CLASSES[5]])
    with torch.no_grad():
        assert (method.predict(images) - zero_shot.predict(images)).abs().max() <= 1e-4


def test_wiseft_chooses_alpha_on_validation_only(image_folder, tmp_path, monkeypatch):
    seen = []
    choose = WiSEFT.choose_alpha

    def spy(self, loader):
        seen.extend(str(it.path) for it in loader.dataset.items)
        return choose(self, loader)

    monkeypatch.setattr(WiSEFT, "choose_alpha", spy)
    over = tiny_overrides(image_folder, tmp_path, "wiseft", **{
        "trainer.max_steps": 2, "optim.warmup_steps": 1, "run_name": "w", "data.setting": "base2novel"})
    res = run_fit(load_recipe(RECIPES / "wiseft/fewshot.yaml", over))
    assert seen and all(p.startswith("val/") for p in seen), seen[:3]
    sweep = res["sweep"]
    assert sweep["name"] == "alpha" and [row["alpha"] for row in sweep["values"]] == [i / 10 for i in range(11)]
    assert all({"base_acc", "novel_acc", "hm"} <= set(row["metrics"]) for row in sweep["values"])
    assert res["scalars"]["alpha"] == sweep["chosen"]
    chosen = next(row for row in sweep["values"] if row["alpha"] == sweep["chosen"])
    assert chosen["metrics"] == res["metrics"]  # the reported run is the chosen alpha's
    saved = json.loads((tmp_path / "w" / "results.json").read_text())
    assert saved["sweep"] == sweep
    # the adapter holds theta_1 and alpha, and rebuilds theta(alpha)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "w" / "adapter" / "adapter.safetensors"))
    assert float(state["alpha"]) == sweep["chosen"] and any(k.startswith("backbone.model.visual.") for k in state)


# ------------------------------------------------------------------ the shipped world -----------
# A short budget (the recipes' optimisation at a higher lr, or WiSE-FT with a short warm-up and
# three alphas), so the five runs stay within CI's time; the recipes' own lr 2e-4 is set for
# thousands of steps (experiments/results/weight_space.md: 200 steps at the recipes' settings).
SHORT = ["trainer.max_steps=40", "optim.lr=0.001"]
WORLD = {"lora": SHORT, "dora": SHORT, "lntuning": SHORT, "bitfit": SHORT,
         "wiseft": ["trainer.max_steps=40", "optim.warmup_steps=10", "method.alphas=[0.0,0.5,1.0]"]}


@pytest.mark.skipif(not WEIGHTS.exists(), reason="run experiments/pretrain_world.py first")
@pytest.mark.parametrize("name", sorted(WORLD))
def test_weight_space_methods_beat_zero_shot_on_world_colour(name, tmp_path):
    recipe = load_recipe(RECIPES / name / "fewshot.yaml", [
        "backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
        "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false", "logger.csv=false",
        "baseline=true", f"output_dir={tmp_path}", *WORLD[name]])
    res = run_fit(recipe)
    acc, zs = res["metrics"]["test_acc"], res["zeroshot_metrics"]["test_acc"]
    assert acc >= zs + 5.0, (name, acc, zs)
