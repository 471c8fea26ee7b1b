"""End to end on a tiny backbone and generated images: fit, run directory, resume, export, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from adapt.cli import main
from adapt.config import load_recipe
from adapt.run import Experiment, run_fit
from tests.conftest import tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _train_loss(exp: Experiment) -> float:
    """Mean cross-entropy over the few-shot training images, without augmentation."""
    exp.method.eval()
    loader = exp.data.dataloader(exp.data.train_items, exp.data.test_transform(), 64)
    with torch.no_grad():
        losses = [F.cross_entropy(exp.method(x), y, reduction="sum") for x, y in loader]
    return float(sum(losses)) / len(exp.data.train_items)


def _epochs_done(ckpt: dict) -> int:
    # written at an epoch end, when Lightning counts the epoch as processed
    return ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


def test_short_coop_fit_lowers_loss_and_keeps_backbone(image_folder, tmp_path):
    recipe = load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, **{"method.n_ctx": 4, "optim.lr": 0.05, "optim.warmup_epochs": 0,
                                   "trainer.max_epochs": 8}))
    exp = Experiment(recipe)
    frozen = {k: v.clone() for k, v in exp.backbone.state_dict().items()}
    before = _train_loss(exp)
    exp.fit()
    after = _train_loss(exp)
    assert after < before - 0.05, (before, after)
    for k, v in exp.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), f"backbone tensor {k} changed"


def test_run_directory_results_resume_and_export(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, **{"method.n_ctx": 4, "data.setting": "base2novel",
                                                     "run_name": "b2n"})
    results = run_fit(load_recipe(RECIPES / "coop/base2novel.yaml", over))
    run = tmp_path / "b2n"
    for name in ("recipe.yaml", "results.json", "manifest.json", "adapter/adapter.safetensors",
                 "adapter/adapter.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["setting"] == "base2novel" and saved["shots"] == 4 and saved["seed"] == 1
    m = saved["metrics"]
    assert m["hm"] == results["metrics"]["hm"]
    assert abs(m["hm"] - 2 * m["base_acc"] * m["novel_acc"] / (m["base_acc"] + m["novel_acc"])) < 1e-9
    assert saved["classes"] == {"base": 3, "novel": 3}
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"method.prompts.ctx"}  # no frozen weights in checkpoints
    assert _epochs_done(ckpt) == 2

    # resume: two more epochs from the checkpoint
    more = load_recipe(run / "recipe.yaml", ["resume=true", "trainer.max_epochs=4"])
    run_fit(more)
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert _epochs_done(ckpt) == 4

    # CLI: evaluate the run directory (its adapter is loaded), then export
    assert main(["test", str(run)]) == 0
    retest = json.loads((run / "test_results.json").read_text())
    assert retest["metrics"] == json.loads((run / "results.json").read_text())["metrics"]
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported/adapter.safetensors").is_file()


def test_cli_reports_recipe_errors(capsys):
    assert main(["fit", str(RECIPES / "coop/fewshot.yaml"), "data.shtos=4"]) == 2
    assert "Did you mean 'data.shots'" in capsys.readouterr().err
