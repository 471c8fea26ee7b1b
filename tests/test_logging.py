"""Logging: wandb is optional, off by default and works offline; the training log is kept."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from adapt.config import load_recipe
from adapt.engine import build_trainer
from adapt.run import Experiment, run_fit
from tests.conftest import tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_wandb_is_off_by_default(tmp_path):
    recipe = load_recipe(RECIPES / "coop/tiny.yaml")
    assert recipe.logger.wandb is False
    trainer = build_trainer(recipe, tmp_path)
    assert [type(l).__name__ for l in trainer.loggers] == ["CSVLogger"]


def test_wandb_offline_logger_writes_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(RECIPES / "coop/tiny.yaml", ["logger.wandb=true", "logger.mode=offline"])
    trainer = build_trainer(recipe, tmp_path)
    wandb_logger = [l for l in trainer.loggers if type(l).__name__ == "WandbLogger"][0]
    wandb_logger.log_metrics({"x": 1.0}, step=0)
    wandb_logger.experiment.finish()
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_training_log_survives_evaluation_and_gets_final_metrics(image_folder, tmp_path):
    # evaluation passes (base, novel, the zero-shot baseline) must not replace the training log
    recipe = load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, **{"logger.csv": "true", "data.setting": "base2novel",
                                   "baseline": "true", "trainer.max_epochs": 3}))
    res = run_fit(recipe)
    rows = list(csv.DictReader(open(Path(res["run_dir"]) / "logs" / "metrics.csv")))
    epochs = {r["epoch"] for r in rows if r.get("train/loss_epoch")}
    assert epochs == {"0", "1", "2"}
    final = [r for r in rows if r.get("final/hm")]
    assert len(final) == 1
    assert float(final[0]["final/base_acc"]) == pytest.approx(res["metrics"]["base_acc"])


def test_method_that_cannot_see_novel_classes_is_refused_early(image_folder, tmp_path):
    recipe = load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, **{"data.setting": "base2novel", "method.csc": "true"}))
    with pytest.raises(ValueError, match="novel classes.*data.setting=all or method.csc=false"):
        Experiment(recipe)


def test_evaluation_trainers_neither_log_nor_shard_the_test_set(tmp_path):
    recipe = load_recipe(RECIPES / "coop/tiny.yaml", ["logger.wandb=false"])
    fit, evaluation = build_trainer(recipe, tmp_path), build_trainer(recipe, tmp_path, evaluation=True)
    assert fit.loggers and not evaluation.loggers
    # a DistributedSampler pads each rank's share with repeats: evaluation reads unpadded shares,
    # training its slice of every global batch (adapt.data.sharding); Lightning's is never used
    assert not fit._accelerator_connector.use_distributed_sampler
    assert not evaluation._accelerator_connector.use_distributed_sampler
    assert not evaluation.checkpoint_callbacks and len(fit.checkpoint_callbacks) == 1
