"""Class text beyond templates (``data.class_text``), CuPL and VCD.

Pinned: the files' checks (one message per problem, naming the file and classes, before the
backbone loads); keys matched by name, not order; VCD's descriptor sentences string for string
(against its own ``load_gpt_descriptions`` when ``ADAPT_VCD_REPO`` names a checkout of
sachit-menon/classify_by_description_release); CuPL's classifier and VCD's scores against hand
computations of the originals' formulas; chunked encoding; any hand-written classifier taking the
text; adapters and checkpoints carrying it without the files; the world's description generator.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import RecipeError, load_recipe
from adapt.data.class_text import ClassText, ClassTextConfig, load_class_text
from adapt.data.world.descriptions import describe, main as describe_main
from adapt.data.world.tasks import TASKS
from adapt.export import AdapterError, load_adapter, save_adapter
from adapt.methods import build_method
from adapt.methods import class_text as class_text_mod
from adapt.methods.class_text import compose_descriptor, vcd_descriptor
from adapt.run import Experiment, run_fit
from tests.conftest import CLASSES, COLOUR_DESCRIPTIONS, COLOUR_DESCRIPTORS, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NAMES = CLASSES[:4]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _write(tmp_path, data, name="text.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _text(path, kind="descriptions", classes=NAMES, templates=False) -> ClassText:
    return load_class_text(ClassTextConfig(**{kind: path}, templates=templates), classes)


# ------------------------------------------------------------------ the files' checks ---------
@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "holds a list, not an object"),
    ("{not json", "not valid JSON"),
    ({"red": ["a"], "Red": ["b"], "green": ["c"]}, "appear under more than one key \\('red' / 'Red'\\)"),
    ('{"red": ["a"], "red": ["b"], "green": ["c"]}', "more than one key \\('red' / 'red'\\)"),
    ({"red": ["a"]}, "1 of the 2 classes have no entry: 'green'; add them"),
    ({"red": ["a"], "green": "a green thing"}, "the entry of 'green' is not a list of strings"),
    ({"red": ["a"], "green": ["  "]}, "classes 'green' have no sentence"),
])
def test_a_bad_descriptions_file_is_one_message(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=f"data.class_text.descriptions={path}: .*{message}"):
        _text(path, classes=["red", "green"])


def test_a_missing_file_and_templates_without_a_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file; give a JSON file of sentences per class"):
        _text(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="templates=true adds the templates .* none is given"):
        load_class_text(ClassTextConfig(templates=True), NAMES)
    assert load_class_text(ClassTextConfig(), NAMES) is None


def test_keys_match_by_normalised_name_never_by_order(tmp_path, caplog):
    forward = {"Light_Grey": ["x one"], "dark  grey": ["y one", "y two"], "unused": ["z"]}
    backward = dict(reversed(list(forward.items())))
    a = _text(_write(tmp_path, forward, "a.json"), classes=["light grey", "dark_grey"])
    b = _text(_write(tmp_path, backward, "b.json"), classes=["light grey", "dark_grey"])
    assert a == b and a.sentences_of("light grey") == ["x one"] and a.sentences_of("dark grey") == ["y one", "y two"]
    assert "unused" not in a.descriptions  # a key naming no class is left out (and logged)


def test_empty_descriptors_are_the_name_alone_as_vcd_does(tmp_path, caplog):
    text = _text(_write(tmp_path, {"red": ["a fruit"], "green": []}), "descriptors", ["red", "green"])
    assert "classes 'green' have no descriptor" in caplog.text
    assert class_text_mod.class_prompts("green", TEMPLATES, text) == ["green, which has "]
    assert class_text_mod.class_prompts("red", TEMPLATES, text) == ["red, which is a fruit"]


# ------------------------------------------------------------------ VCD's sentences -----------
@pytest.mark.parametrize("phrase,sentence", [
    ("a freshwater fish", "which is a freshwater fish"),
    ("antennae", "which is antennae"),  # the original's startswith('a') quirk, kept
    ("has a long tail", "which has a long tail"), ("often found in ponds", "which often found in ponds"),
    ("used for cutting", "which is used for cutting"), ("olive green scales", "which has olive green scales"),
])
def test_vcd_descriptor_rule(phrase, sentence):
    assert vcd_descriptor(phrase) == sentence


def test_descriptor_composition_variants():
    assert compose_descriptor("tench", "fins") == "tench, which has fins"
    assert compose_descriptor("tench", "fins", after=".") == "tench, which has fins."
    assert compose_descriptor("tench", "fins", inclusion="append") == "which has fins, tench"
    assert compose_descriptor("tench", "fins", inclusion="none", modify=False) == "fins"


@pytest.mark.skipif(not os.environ.get("ADAPT_VCD_REPO"), reason="set ADAPT_VCD_REPO to a checkout of "
                    "sachit-menon/classify_by_description_release")
@pytest.mark.parametrize("inclusion,after", [("prepend", ""), ("prepend", "."), ("append", "")])
def test_vcd_sentences_equal_the_originals(tmp_path, inclusion, after):
    sys.path.insert(0, os.environ["ADAPT_VCD_REPO"])
    try:
        original = importlib.import_module("loading_helpers")
    finally:
        sys.path.pop(0)
    phrases = {"red_fox": ["a small canine", "has a bushy tail", "used in stories", "orange fur", "antennae"],
               "goldfish": []}
    path = _write(tmp_path, phrases, "d.json")
    hparams = {"descriptor_fname": path, "category_name_inclusion": inclusion, "apply_descriptor_modification": True,
               "before_text": "", "between_text": ", ", "after_text": after}
    theirs, _ = original.load_gpt_descriptions(hparams, None)
    method = build_method("vcd", {"name_inclusion": inclusion, "after_text": after}, _backbone(),
                          ["red fox", "goldfish"], TEMPLATES,
                          class_text=_text(path, "descriptors", ["red fox", "goldfish"]))
    mine = [method.prompts[i] for i in range(len(method.prompts))]
    assert mine == theirs["red_fox"] + theirs["goldfish"]


# ------------------------------------------------------------------ the classifiers -----------
def _backbone():
    from tests.conftest import make_backbone
    return make_backbone()


def _encode(backbone, prompts):
    with torch.no_grad():
        return backbone.encode_text(backbone.tokenize(prompts))


def test_cupl_classifier_is_the_originals_formula(tiny_backbone):
    """zeroshot_classifier_gpt: per class, normalize(mean(normalize(E(s)))) over its sentences
    (with use_both, the templates' prompts first, in the same mean)."""
    desc = json.loads(COLOUR_DESCRIPTIONS.read_text())
    for both in (False, True):
        text = _text(str(COLOUR_DESCRIPTIONS), templates=both, classes=CLASSES)
        method = build_method("cupl", None, tiny_backbone, NAMES, TEMPLATES, class_text=text)
        want = []
        for c in NAMES:
            texts = ([t.format(c) for t in TEMPLATES] if both else []) + desc[c]
            want.append(F.normalize(_encode(tiny_backbone, texts).mean(0), dim=-1))
        torch.testing.assert_close(method.text_features, torch.stack(want), rtol=0, atol=2e-6)
        image = F.normalize(torch.randn(5, tiny_backbone.embed_dim), dim=-1)
        torch.testing.assert_close(method(image), tiny_backbone.logit_scale * image @ torch.stack(want).t(),
                                   rtol=1e-5, atol=1e-5)


def test_vcd_scores_are_mean_cosines_and_explain_ranks_them(tiny_backbone):
    text = _text(str(COLOUR_DESCRIPTORS), "descriptors", CLASSES)
    method = build_method("vcd", None, tiny_backbone, NAMES, TEMPLATES, class_text=text)
    best = build_method("vcd", {"aggregate": "max"}, tiny_backbone, NAMES, TEMPLATES, class_text=text)
    image = F.normalize(torch.randn(5, tiny_backbone.embed_dim), dim=-1)
    phrases = json.loads(COLOUR_DESCRIPTORS.read_text())
    mean, top = [], []
    for c in NAMES:
        e = F.normalize(_encode(tiny_backbone, [compose_descriptor(c, p) for p in phrases[c]]), dim=-1)
        cos = image @ e.t()
        mean.append(cos.mean(1))
        top.append(cos.max(1).values)
    scale = tiny_backbone.logit_scale
    torch.testing.assert_close(method(image), scale * torch.stack(mean, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(best(image), scale * torch.stack(top, 1), rtol=1e-5, atol=1e-5)
    why = method.explain(image, classes=torch.tensor([2] * 5), top=2)
    for i, rows in enumerate(why):
        scores = [s for _, s in rows]
        assert scores == sorted(scores, reverse=True) and all(p.startswith("blue, ") for p, _ in rows)
        assert scores[0] == pytest.approx(float(top[2][i]), abs=1e-5)


def test_chunked_encoding_equals_one_pass(tiny_backbone, monkeypatch):
    text = _text(str(COLOUR_DESCRIPTIONS), classes=CLASSES)
    whole = build_method("cupl", None, tiny_backbone, CLASSES, TEMPLATES, class_text=text).text_features
    monkeypatch.setattr(class_text_mod, "PROMPT_CHUNK", 3)
    chunked = build_method("cupl", None, tiny_backbone, CLASSES, TEMPLATES, class_text=text).text_features
    torch.testing.assert_close(chunked, whole, rtol=0, atol=2e-6)


def test_any_hand_written_classifier_takes_class_text(tiny_backbone):
    text = _text(str(COLOUR_DESCRIPTIONS), classes=CLASSES)
    image = F.normalize(torch.randn(3, tiny_backbone.embed_dim), dim=-1)
    cupl = build_method("cupl", None, tiny_backbone, NAMES, TEMPLATES, class_text=text)(image)
    zs = build_method("zeroshot", None, tiny_backbone, NAMES, TEMPLATES, class_text=text)(image)
    plain = build_method("zeroshot", None, tiny_backbone, NAMES, TEMPLATES)(image)
    torch.testing.assert_close(zs, cupl, rtol=0, atol=1e-5)
    assert (zs - plain).abs().max() > 1e-2  # the text changed the classifier
    kg = build_method("kgcoop", None, tiny_backbone, NAMES, TEMPLATES, class_text=text)  # its anchor
    torch.testing.assert_close(kg.handcrafted(), build_method("cupl", None, tiny_backbone, NAMES, TEMPLATES,
                                                              class_text=text).text_features, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="method 'coop' does not build its classifier from hand-written class "
                                         "text.*use a method that reads it: .*cupl"):
        build_method("coop", None, tiny_backbone, NAMES, TEMPLATES, class_text=text)


def test_an_adapter_carries_its_class_text(tiny_backbone, tmp_path):
    text = _text(str(COLOUR_DESCRIPTIONS), classes=CLASSES)
    method = build_method("clipadapter", None, tiny_backbone, NAMES, TEMPLATES, class_text=text).eval()
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = save_adapter(method, tmp_path / "adapter")
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["class_text"]["descriptions"]["red"] == json.loads(COLOUR_DESCRIPTIONS.read_text())["red"]
    image = torch.randn(2, 3, 32, 32)
    back = load_adapter(out, backbone=tiny_backbone).eval()
    torch.testing.assert_close(back(image), method(image), rtol=0, atol=1e-5)
    meta["class_text"]["descriptions"]["red"] = "a red thing"
    (out / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match='"class_text" is not an object of class -> list of sentences'):
        load_adapter(out, backbone=tiny_backbone)


def test_a_checkpoint_rebuilds_its_class_text(tiny_backbone):
    from adapt.engine import AdaptModule

    text = _text(str(COLOUR_DESCRIPTIONS), classes=CLASSES)
    module = AdaptModule("cupl", None, NAMES, TEMPLATES, {"name": "adapt-tiny-vit", "pretrained": None},
                         {}, 1, prebuilt_backbone=tiny_backbone, class_text=text.to_plain())
    assert module.hparams["class_text"]["descriptions"]["red"] == text.sentences_of("red")
    assert module.method.class_text == text


# ------------------------------------------------------------------ through the runner --------
def test_recipes_are_checked_before_the_backbone_loads(image_folder, tmp_path, monkeypatch):
    import adapt.run

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was built before the class text was checked")

    monkeypatch.setattr(adapt.run, "build_backbone", no_backbone)
    over = tiny_overrides(image_folder, tmp_path, "cupl", **{"trainer.max_epochs": 0})
    with pytest.raises(RecipeError, match="method 'cupl' needs data.class_text.descriptions: a JSON file of "
                                          "sentences per class"):
        Experiment(load_recipe(RECIPES / "cupl/world.yaml", over + ["data.class_text.descriptions=null"]))
    partial = _write(tmp_path, {c: ["x"] for c in CLASSES[:-1]})
    with pytest.raises(RecipeError, match=f"data.class_text.descriptions={partial}: 1 of the 6 classes have no "
                                          "entry: 'cyan'"):
        Experiment(load_recipe(RECIPES / "cupl/world.yaml", over + [f"data.class_text.descriptions={partial}"]))
    coop = tiny_overrides(image_folder, tmp_path, "coop", **{"data.class_text.descriptions": str(COLOUR_DESCRIPTIONS)})
    with pytest.raises(RecipeError, match="method 'coop' does not build its classifier from hand-written class text"):
        Experiment(load_recipe(RECIPES / "coop/fewshot.yaml", coop))


def test_base_to_novel_describes_the_novel_classes_too(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, "cupl", **{
        "trainer.max_epochs": 0, "data.setting": "base2novel", "run_name": "b2n",
        "data.class_text.descriptions": str(COLOUR_DESCRIPTIONS)})
    results = run_fit(load_recipe(RECIPES / "cupl/world.yaml", over))
    zs = run_fit(load_recipe(RECIPES / "cupl/world.yaml", tiny_overrides(image_folder, tmp_path, "zeroshot", **{
        "trainer.max_epochs": 0, "data.setting": "base2novel", "run_name": "zs",
        "data.class_text.descriptions": str(COLOUR_DESCRIPTIONS)})))
    assert set(results["metrics"]) >= {"base_acc", "novel_acc", "hm"}
    assert results["metrics"] == zs["metrics"]  # one path: zero-shot on the same text is CuPL


# ------------------------------------------------------------------ the world's descriptions --
def test_world_descriptions_modes(tmp_path):
    task = TASKS["world_colour"]
    faithful = describe("world_colour", "faithful", per_class=20, seed=3)
    assert faithful == describe("world_colour", "faithful", per_class=20, seed=3)  # seeded
    assert list(faithful) == task.classnames and all(len(v) == 20 for v in faithful.values())
    assert all(c in s.split() for c, sentences in faithful.items() for s in sentences)
    wrong = describe("world_colour", "noisy", per_class=20, noise=1.0, seed=3)
    assert not any(c in s.split() for c, sentences in wrong.items() for s in sentences)
    rand = describe("world_colour", "random", per_class=5, seed=3)
    colours = set(task.classnames)
    for c, sentences in rand.items():
        for s in sentences:
            assert s.startswith(f"{c}, which has ") and not set(s.split()[3:]) & colours
    out = tmp_path / "d.json"
    describe_main(["world_colour", str(out), "--format", "descriptors"])
    assert all(len(v) == 6 for v in json.loads(out.read_text()).values())
    with pytest.raises(SystemExit):  # an existing file is not replaced without --overwrite
        describe_main(["world_colour", str(out)])
    assert all(len(v) == 6 for v in json.loads(out.read_text()).values())


def test_the_shipped_world_files_are_the_generators():
    root = Path(__file__).resolve().parents[1] / "adapt/data/world"
    assert json.loads((root / "world_colour_descriptions.json").read_text()) == describe("world_colour")
    assert json.loads((root / "world_colour_descriptors.json").read_text()) == describe("world_colour", per_class=6)
