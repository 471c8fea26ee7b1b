"""wandb is optional, off by default, and works offline."""
from __future__ import annotations

from pathlib import Path

from adapt.config import load_recipe
from adapt.engine import build_trainer

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
