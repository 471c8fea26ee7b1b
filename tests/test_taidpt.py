"""Captions as training data (``data.captions``) and TaI-DPT.

Pinned: the lemmatiser's plural rules; caption labelling as the original's (several-word names
first and removed, the joined form, synonyms); the corpus formats and their bad forms, each one
message before anything loads; the stream's template texts; TaI-DPT's scores against a hand
computation, its loss as the sum of two ranking losses, and — with a checkout of guozix/TaI-DPT
named by ``ADAPT_TAIDPT_REPO`` — its caption-branch scores, loss and gradients against the
original's own ``DenseCLIP.forward``; through the runner, that a caption-trained run reads token
batches in training and images in evaluation, and refusals for the wrong pairings; the world's
caption corpus.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from adapt.config import RecipeError, load_recipe
from adapt.data.captions import CaptionsConfig, caption_stream, label_captions, read_corpus, read_synonyms, singular
from adapt.data.world.corpus import corpus, main as corpus_main
from adapt.data.world.multi import MULTI_TASKS
from adapt.methods import build_method
from adapt.methods.taidpt import local_scores
from adapt.run import Experiment, run_fit
from adapt.tasks.losses import ranking_loss
from tests.conftest import CLASSES, make_backbone, tiny_overrides

from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NAMES = CLASSES[:4]


@pytest.mark.parametrize("word,lemma", [
    ("stars", "star"), ("buses", "bus"), ("bus", "bus"), ("puppies", "puppy"), ("knives", "knife"),
    ("wolves", "wolf"), ("boxes", "box"), ("glass", "glass"), ("glasses", "glasses"), ("people", "people"),
    ("women", "woman"), ("sheep", "sheep"), ("tomatoes", "tomato"), ("cactus", "cactus"), ("red", "red"),
])
def test_singular(word, lemma):
    assert singular(word) == lemma


def test_captions_are_labelled_as_the_original_matches_them():
    names = [["aeroplane", "air plane", "jet"], ["motor bike"], ["dog", "puppy"], ["person", "man"]]
    captions = ["Two Jets fly over a man", "a motorbike and some puppies", "an air plane", "a cat on a mat",
                "motor bikes parked", "a dog-man statue"]
    kept, labels = label_captions(captions, names)
    assert kept == ["Two Jets fly over a man", "a motorbike and some puppies", "an air plane",
                    "motor bikes parked", "a dog-man statue"]
    assert labels == [[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    # a several-word name is removed before single words are read: "air plane" does not also
    # count the word "plane" of another class
    kept, labels = label_captions(["an air plane"], [["air plane"], ["plane"]])
    assert labels == [[1, 0]]


def test_corpus_formats_and_bad_forms(tmp_path):
    lines = tmp_path / "c.txt"
    lines.write_text("a red star\n\n  a blue ring  \n")
    assert read_corpus(str(lines)) == ["a red star", "a blue ring"]
    listed = tmp_path / "c.json"
    listed.write_text(json.dumps(["a red star"]))
    assert read_corpus(str(listed)) == ["a red star"]
    coco = tmp_path / "captions_train2017.json"
    coco.write_text(json.dumps({"annotations": [{"id": 1, "caption": "A red star."}, {"caption": " a dog "}]}))
    assert read_corpus(str(coco)) == ["A red star.", "a dog"]
    for content, message in [("{bad", "not valid JSON"), (json.dumps({"x": 1}), "a JSON corpus is a list of caption strings or a COCO")]:
        listed.write_text(content)
        with pytest.raises(ValueError, match=f"data.captions.file={listed}: {message}"):
            read_corpus(str(listed))
    with pytest.raises(ValueError, match="no such file; give a text file of one caption per line"):
        read_corpus(str(tmp_path / "none.txt"))
    syn = tmp_path / "s.json"
    syn.write_text(json.dumps({"Red": ["crimson"], "violet": ["lilac"]}))
    with pytest.raises(ValueError, match="'violet' name no class of this data"):
        read_synonyms(str(syn), ["red", "blue"])
    syn.write_text(json.dumps({"Red": ["crimson"]}))
    assert read_synonyms(str(syn), ["red", "blue"]) == [["red", "crimson"], ["blue"]]


def test_the_stream_adds_each_class_template_texts(tmp_path):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("a red star and a blue ring\na green heart\nnothing here\n")
    texts, labels = caption_stream(CaptionsConfig(file=str(corpus_file), template_copies=2), ["red", "blue", "green"])
    assert texts[:2] == ["a red star and a blue ring", "a green heart"] and labels[:2] == [[1, 1, 0], [0, 0, 1]]
    per_class = 2 + 80  # the copies of "a photo of a {}." and CLIP's 80 ImageNet templates
    assert len(texts) == 2 + 3 * per_class
    blue = [t for t, y in zip(texts[2:], labels[2:]) if y == [0, 1, 0]]
    assert blue[:3] == ["a photo of a blue.", "a photo of a blue.", "a bad photo of a blue."] and len(blue) == per_class
    corpus_file.write_text("nothing here\n")
    with pytest.raises(ValueError, match="none of its 1 captions names a class"):
        caption_stream(CaptionsConfig(file=str(corpus_file)), ["red"])


# ------------------------------------------------------------------ the method -----------------
def _taidpt(backbone, **cfg):
    torch.manual_seed(0)
    return build_method("taidpt", cfg or None, backbone, NAMES, ["a photo of a {}."], task="multi_label")


def test_caption_scores_are_the_formula_and_the_loss_two_rankings(tiny_backbone):
    method = _taidpt(tiny_backbone).train()
    tokens = tiny_backbone.tokenize(["a red star and a blue ring", "a green heart", "a yellow cross"])
    out = method.output(tokens)
    with torch.no_grad():
        seq = tiny_backbone.encode_text_dense(tiny_backbone.embed_tokens(tokens), tokens)
        t = method.global_prompts.text_features()
        t2 = method.local_prompts.text_features()
    eot = tokens.argmax(-1)
    for b in range(3):  # by hand, over the valid positions only (SOT .. EOT)
        h = seq.tokens[b, :eot[b] + 1]
        a = h @ t2.t()
        local = (F.softmax(50 * a, dim=0) * 4 * a).sum(0)
        torch.testing.assert_close(out.tensors["local"][b], local, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.tensors["global"][b], 4 * seq.pooled[b] @ t.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, 0.5 * out.tensors["global"] + 0.5 * out.tensors["local"])
    y = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    loss = method.loss(out, y)
    torch.testing.assert_close(loss, ranking_loss(out.tensors["global"], y) + ranking_loss(out.tensors["local"], y))
    loss.backward()  # only the prompts learn
    assert method.global_prompts.ctx.grad.abs().sum() > 0 and method.local_prompts.ctx.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in tiny_backbone.parameters())


def test_images_are_scored_by_the_merged_global_and_local_scores(tiny_backbone):
    method = _taidpt(tiny_backbone, merge=0.25).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = tiny_backbone.encode_image_dense(images, outputs=("pooled", "value"))
        t = method.text_features()
        glob = 4 * dense.pooled @ t[0].t()
        local = local_scores(dense.value, t[1], 40.0, 4.0)
        torch.testing.assert_close(method(images), 0.25 * glob + 0.75 * local, rtol=1e-5, atol=1e-5)
        by_hand = (F.softmax(40 * dense.value @ t[1].t(), dim=1) * 4 * (dense.value @ t[1].t())).sum(1)
        torch.testing.assert_close(local, by_hand)


REPO = os.environ.get("ADAPT_TAIDPT_REPO")


def _original(backbone):
    """The original's DenseCLIP caption branch on the backbone's weights (its prompt learner and
    text encoder; the ResNet image pieces of its constructor are not built: a ViT has none)."""
    from experiments.original_coop import _install_dassl_stand_in, clip_on, import_checkout

    _install_dassl_stand_in()
    sys.modules.setdefault("pickle5", importlib.import_module("pickle"))
    import numpy
    if not hasattr(numpy, "deprecate"):  # its trainers/utils.py imports it; numpy 2 removed it
        numpy.deprecate = lambda *a, **k: (lambda f: f)
    clip, trainer = import_checkout(Path(REPO), "clip", "trainers.Caption_distill_double")
    model = clip_on(clip.clip, backbone)
    ns = types.SimpleNamespace
    cfg = ns(TRAINER=ns(Caption=ns(N_CTX=16, CTX_INIT="", CSC=False, CLASS_TOKEN_POSITION="end")),
             INPUT=ns(SIZE=(model.visual.input_resolution,)),
             TRAIN=ns(IF_LEARN_SCALE=False, IF_LEARN_spatial_SCALE=False, spatial_SCALE_text=50))
    dense = trainer.DenseCLIP.__new__(trainer.DenseCLIP)
    torch.nn.Module.__init__(dense)
    dense.prompt_learner = trainer.PromptLearner(cfg, NAMES, model)
    dense.tokenized_prompts = dense.prompt_learner.tokenized_prompts
    dense.text_encoder = trainer.TextEncoder(model)
    dense.cfg = cfg
    return dense, trainer


@pytest.mark.skipif(not REPO, reason="set ADAPT_TAIDPT_REPO to a checkout of guozix/TaI-DPT")
def test_caption_branch_equals_the_originals():
    backbone = make_backbone("test-vit-openai-77")
    original, trainer = _original(backbone)
    method = _taidpt(backbone).train()
    learner = original.prompt_learner
    with torch.no_grad():  # the same context values in both
        learner.ctx.copy_(method.global_prompts.ctx)
        learner.ctx_double.copy_(method.local_prompts.ctx)
    captions = ["a red star and a blue ring on a grey background", "green", "a photo of a purple and a yellow cat"]
    tokens = torch.cat([trainer.clip.tokenize(c) for c in captions])
    glob, local, _, _ = original(None, tokens)
    y = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]])
    theirs = trainer.ranking_loss(glob, y, scale_=1.0, margin_=1) + trainer.ranking_loss(local, y, scale_=1.0, margin_=1)
    theirs.backward()
    out = method.output(tokens)
    mine = method.loss(out, y)
    mine.backward()
    torch.testing.assert_close(out.tensors["global"], glob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tensors["local"], local, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    for mine_g, theirs_g in ((method.global_prompts.ctx.grad, learner.ctx.grad),
                             (method.local_prompts.ctx.grad, learner.ctx_double.grad)):
        # relative to the gradient's norm: the local softmax at scale 50 amplifies round-off in
        # its small entries (the paths cut the sequences at different lengths)
        assert float((mine_g - theirs_g).norm() / theirs_g.norm()) < 1e-4


# ------------------------------------------------------------------ through the runner --------
def _corpus(tmp_path) -> str:
    path = tmp_path / "captions.txt"
    path.write_text("".join(f"a {a} shape and a {b} shape\n" for a in CLASSES for b in CLASSES if a != b))
    return str(path)


def test_a_caption_trained_run(multilabel_folder, image_folder, tmp_path, monkeypatch):
    from adapt.datamodule import AdaptDataModule

    seen = []
    orig = AdaptDataModule.train_dataloader

    def spy(self, *a, **k):
        loader = orig(self, *a, **k)
        seen.append(next(iter(loader))[0].dtype)
        return loader

    monkeypatch.setattr(AdaptDataModule, "train_dataloader", spy)
    over = tiny_overrides(image_folder, tmp_path, "taidpt", **{
        "data.dataset": "multilabel_csv", "data.root": str(multilabel_folder), "data.shots": 0,
        "data.captions.file": _corpus(tmp_path), "data.captions.templates": "false", "data.batch_size": 16,
        "trainer.max_epochs": 2, "run_name": "t"})
    results = run_fit(load_recipe(RECIPES / "taidpt/world.yaml", over))
    assert seen and all(d == torch.int64 for d in seen)  # token ids in training, never images
    assert 0 <= results["metrics"]["test_map"] <= 100 and results["trainable_params"] == 2 * 16 * 64


def test_wrong_pairings_are_refused_before_the_backbone_loads(multilabel_folder, image_folder, tmp_path, monkeypatch):
    import adapt.run

    monkeypatch.setattr(adapt.run, "build_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    data = {"data.dataset": "multilabel_csv", "data.root": str(multilabel_folder), "data.shots": 0}
    over = tiny_overrides(image_folder, tmp_path, "taidpt", **data, **{"data.captions.file": "null"})
    with pytest.raises(RecipeError, match="method 'taidpt' needs data.captions.file: a caption corpus"):
        Experiment(load_recipe(RECIPES / "taidpt/world.yaml", over))
    over = tiny_overrides(image_folder, tmp_path, "dualcoop", **data, **{"data.captions.file": _corpus(tmp_path)})
    with pytest.raises(RecipeError, match="method 'dualcoop' trains on images and would ignore the captions.*taidpt"):
        Experiment(load_recipe(RECIPES / "dualcoop/world.yaml", over))


def test_the_world_corpus(tmp_path):
    task = MULTI_TASKS["world_multi_colour"]
    first = corpus(task, 200, seed=1)
    assert first == corpus(task, 200, seed=1) and first != corpus(task, 200, seed=2)
    kept, labels = label_captions(first, [[c] for c in task.classnames])
    assert len(kept) >= 190  # a caption rarely omits every label word
    counts = [sum(y) for y in labels]
    assert max(counts) == 3 and min(counts) == 1  # 1-3 objects, as the task draws them
    out = tmp_path / "c.txt"
    corpus_main(["world_multi_colour", str(out), "--n", "5"])
    assert len(out.read_text().splitlines()) == 5
    with pytest.raises(SystemExit):
        corpus_main(["world_multi_colour", str(out), "--n", "7"])
    assert len(out.read_text().splitlines()) == 5
