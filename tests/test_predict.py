"""adapt predict / adapt.load_adapter: the CSV agrees with the method's own evaluation; prompt
adapters take new class names, class-specific ones refuse them; plain-tensor export."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adapt
from adapt.cli import main
from adapt.config import load_recipe
from adapt.run import run_fit
from tests.conftest import tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# an adapter is only meaningful on the weights it was trained on: the shipped pretrained tiny
# CLIP can be rebuilt by load_adapter, a random initialisation cannot
SHIPPED = {"backbone.name": "tiny-vit-p4", "backbone.pretrained": "world"}


@pytest.fixture(scope="module")
def coop_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("coop_runs")
    return run_fit(load_recipe(RECIPES / "coop/fewshot.yaml",
                               tiny_overrides(image_folder, out, **SHIPPED, **{"trainer.max_epochs": 3})))


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_predict_top1_equals_the_methods_own_evaluation(coop_run, image_folder, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["predict", coop_run["adapter_dir"], str(image_folder / "test"), "--top-k", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = _rows(out)
    assert len(rows) == 36 and list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2",
                                                  "label_3", "prob_3"]
    correct = [r["label_1"] == Path(r["path"]).parent.name for r in rows]
    assert 100.0 * sum(correct) / len(rows) == pytest.approx(coop_run["metrics"]["test_acc"])
    for r in rows:  # probabilities sorted, and a distribution over the six classes
        assert float(r["prob_1"]) >= float(r["prob_2"]) >= float(r["prob_3"]) > 0
    # the library call: eval mode, with its preprocessing, same top-1 as the CSV
    model = adapt.load_adapter(coop_run["run_dir"], device="cpu")
    assert not model.training and not model.backbone.training
    from PIL import Image
    x = model.preprocess(Image.open(rows[0]["path"])).unsqueeze(0)
    with torch.no_grad():
        assert model.classnames[model.predict(x).argmax().item()] == rows[0]["label_1"]


def test_prompt_adapter_takes_new_class_names_csc_refuses(coop_run, image_folder, tmp_path):
    out = tmp_path / "new.csv"
    assert main(["predict", coop_run["adapter_dir"], str(image_folder / "test" / "red"),
                 "--classnames", "crimson,navy,black", "--top-k", "5", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 6 and {r["label_1"] for r in rows} <= {"crimson", "navy", "black"}
    assert "label_4" not in rows[0]  # top-k is capped by the number of classes

    csc = run_fit(load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path / "runs", **SHIPPED, **{"method.csc": "true", "trainer.max_epochs": 1})))
    names = tmp_path / "names.txt"
    names.write_text("crimson\nnavy\n")
    err = tmp_path / "refused.csv"
    assert main(["predict", csc["adapter_dir"], str(image_folder / "test"), "--classnames-file", str(names),
                 "--out", str(err)]) == 2
    assert not err.exists()
    with pytest.raises(ValueError, match="cannot classify other class names"):
        adapt.load_adapter(csc["adapter_dir"], classnames=["crimson", "navy"], device="cpu")
    # its own classes are fine
    assert adapt.load_adapter(csc["adapter_dir"], device="cpu").classnames == coop_run_classes(image_folder)


def coop_run_classes(image_folder):
    return sorted(p.name for p in (image_folder / "train").iterdir())


def test_predict_never_overwrites_a_foreign_file(coop_run, image_folder, tmp_path):
    mine = tmp_path / "notes.csv"
    mine.write_text("my,own\n1,2\n")
    assert main(["predict", coop_run["adapter_dir"], str(image_folder / "test" / "red"),
                 "--out", str(mine)]) == 2
    assert mine.read_text() == "my,own\n1,2\n"


def test_plain_prompt_export_holds_context_positions_and_tokenizer(coop_run, tmp_path):
    assert main(["export", coop_run["run_dir"], str(tmp_path / "exp"), "--plain"]) == 0
    path = tmp_path / "exp" / "prompts.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        ctx, pos = f.get_tensor("ctx"), f.get_tensor("ctx_positions")
        state = f.get_tensor("state.prompts.ctx")
    model = adapt.load_adapter(tmp_path / "exp", device="cpu")
    assert torch.equal(ctx, model.prompts.ctx.detach()) and torch.equal(state, ctx)
    n_ctx = model.prompts.n_ctx
    assert pos.shape == (6, n_ctx) and pos[0].tolist() == list(range(1, 1 + n_ctx))
    assert meta["tokenizer"] == "tiny-vit-p4" and meta["method"] == "coop"
    assert meta["classnames"].splitlines() == model.classnames
    # the positions are where the prompt module puts the context
    emb = model.prompts.embeddings()
    assert torch.allclose(emb[2, pos[2]], ctx)


def test_an_adapter_on_random_weights_is_refused_without_its_backbone(image_folder, tmp_path):
    res = run_fit(load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, **{"trainer.max_epochs": 1})))
    with pytest.raises(ValueError, match="randomly initialised.*backbone=") :
        adapt.load_adapter(res["adapter_dir"], device="cpu")
