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


def test_wandb_offline_run_files_hold_config_epochs_and_final_metrics(image_folder, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, **{"logger.wandb": "true", "data.setting": "base2novel",
                                   "trainer.max_epochs": 2}))
    assert recipe.logger.mode == "offline"  # offline unless the user sets a mode
    res = run_fit(recipe)
    runs = list((Path(res["run_dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    log = runs[0].read_bytes()  # the offline run's record log, what `wandb sync` uploads
    for key in ("base_acc", "novel_acc", "hm"):
        assert _wandb_values(log, f"final/{key}")[-1] == pytest.approx(res["metrics"][key], abs=1e-4)
    assert _wandb_values(log, "trainable_params")[-1] == res["trainable_params"]
    assert b"train/loss_epoch" in log  # per-epoch metrics went through the same run
    assert b"n_ctx" in log and b"imagefolder" in log  # the resolved recipe as the run's config


def _wandb_values(log: bytes, key: str) -> list[float]:
    """Values logged under ``key`` in a wandb run file: each item is the key followed by its
    JSON-encoded value (protobuf field 16, ``value_json``: tag bytes 0x82 0x01, then a length)."""
    import re

    out = []
    for m in re.finditer(re.escape(key.encode()) + rb"\x82\x01", log):
        length = log[m.end()]
        out.append(float(log[m.end() + 1:m.end() + 1 + length]))
    return out


def test_tensorboard_without_its_package_is_refused_before_training(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    recipe = load_recipe(RECIPES / "coop/tiny.yaml", ["logger.tensorboard=true"])
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        build_trainer(recipe, tmp_path)


def test_progress_bar_is_one_line_within_80_columns():
    from adapt.loggers import OneLineProgressBar, short_metrics

    shown = short_metrics({"train/loss_step": 1.23456, "train/loss_epoch": 1.5, "train/acc": 0.4567,
                           "v_num": 3})
    assert shown == {"loss": "1.23", "acc": "45.7"}
    from tqdm import tqdm

    line = tqdm.format_meter(n=123, total=456, elapsed=3723, prefix="Epoch 199/200",
                             bar_format=OneLineProgressBar.BAR, postfix=", ".join(f"{k}={v}" for k, v in shown.items()))
    assert "\n" not in line and len(line) <= 80, line
