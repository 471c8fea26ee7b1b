"""The loggers a run writes to, and a one-line progress bar.

- CSV (``logger.csv``, on by default): ``run_dir/logs/metrics.csv``, per-epoch means + final results;
- Weights & Biases (``logger.wandb=true``): the resolved recipe as config, every logged metric per
  epoch (the methods' named scalars included), the final results in the run summary; offline
  (``run_dir/wandb/offline-run-*``, ``wandb sync`` uploads it) unless ``logger.mode`` says otherwise;
- TensorBoard (``logger.tensorboard=true``) when its package is installed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar


def check_logger_config(logger: DictConfig) -> None:
    """Fail before training when a requested logger cannot run."""
    if logger.tensorboard and not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        raise RuntimeError("logger.tensorboard=true needs the tensorboard package: pip install tensorboard "
                           "(or set logger.tensorboard=false)")
    if logger.wandb and importlib.util.find_spec("wandb") is None:
        raise RuntimeError("logger.wandb=true needs the wandb package: pip install wandb (or logger.wandb=false)")


def build_loggers(recipe: DictConfig, run_dir: Path) -> list:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    cfg = recipe.logger
    check_logger_config(cfg)
    loggers = []
    if cfg.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if cfg.wandb:
        loggers.append(WandbLogger(project=cfg.project, save_dir=str(run_dir), mode=cfg.mode,
                                   name=str(run_dir), config=OmegaConf.to_container(recipe, resolve=True)))
    return loggers


def log_final(loggers: list, results: dict, step: int = 0) -> None:
    """The final accuracies (and the methods' named scalars) through every logger, then close
    them: a wandb run's summary holds them, its offline files are complete."""
    finals = {f"final/{k}": v for k, v in results.get("metrics", {}).items()}
    finals.update({f"final/zeroshot_{k}": v for k, v in (results.get("zeroshot_metrics") or {}).items()})
    finals.update({f"final/{k}": v for k, v in (results.get("scalars") or {}).items()
                   if isinstance(v, (int, float))})
    for logger in loggers:
        logger.log_metrics(finals, step=step)
        if type(logger).__name__ == "WandbLogger":
            run = logger.experiment
            run.summary.update({**finals, "trainable_params": results.get("trainable_params"),
                                "fit_seconds": (results.get("timing") or {}).get("fit_seconds")})
            run.finish()
        else:
            logger.save()
            logger.finalize("success")


class OneLineProgressBar(TQDMProgressBar):
    """``Epoch 12/200  40%|████      | 2/5 [00:01<00:02] loss=1.23 acc=45.6``: fits 80 columns
    (Lightning's default postfix, with step and epoch losses and the version, wraps there)."""

    BAR = "{desc} {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.dynamic_ncols = False
        bar.bar_format = self.BAR
        return bar

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer, pl_module) -> dict:
        return short_metrics(super().get_metrics(trainer, pl_module))


def short_metrics(items: dict, limit: int = 3) -> dict:
    """{"train/loss_step": 1.234, "train/loss_epoch": ..., "train/acc": 0.5, "v_num": 0} ->
    {"loss": "1.23", "acc": "50.0"}: one value per name (the step value), at most ``limit``."""
    out: dict[str, str] = {}
    for key, value in items.items():
        if key == "v_num":
            continue
        name = key.split("/")[-1]
        for suffix in ("_step", "_epoch"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        if name in out:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        out[name] = f"{100 * v:.1f}" if name.endswith("acc") and 0 <= v <= 1 else f"{v:.3g}"
        if len(out) == limit:
            break
    return out


def progress_callbacks(enabled: bool) -> list:
    return [OneLineProgressBar(leave=False)] if enabled and sys.stdout is not None else []
