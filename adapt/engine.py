"""The single LightningModule for every method, and the Trainer built from a recipe.

Lightning owns the mechanics (devices, DDP, mixed precision, accumulation, checkpoints, logging);
this module only maps batches to losses and metrics and builds the optimizer from the recipe
(its parameter groups and schedules: ``adapt/engine_optim.py``).
Checkpoints hold the method's trainable state only, never the frozen backbone.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric

from adapt.backbone import BackboneConfig, build_backbone
from adapt.data.class_text import ClassText
from adapt.engine_optim import (epoch_lr_factor, group_lr_factor, group_overrides, optimizer_groups,
                                step_lr_factor, steps_to_epochs)
from adapt.finite import TrainingDiverged, check_finite_state  # noqa: F401  (re-exported)
from adapt.methods import Method, build_method
from adapt.tasks import get_task
from adapt.tasks.single_label import own_task_logits, task_ids

METHOD_PREFIX = "method."


class AdaptModule(pl.LightningModule):
    """The method and its training, built from plain data (what ``save_hyperparameters`` stores),
    so ``AdaptModule.load_from_checkpoint(path)`` rebuilds a run from its checkpoint alone.

    Args:
        method: registered method name.
        method_config: its Config's fields (None = the defaults).
        classnames: the classes it is trained on; templates: the dataset's prompt templates.
        backbone: the ``backbone`` section (``BackboneConfig`` fields).
        optim: the ``optim`` section (``OptimConfig`` fields); max_epochs: the schedule's length.
        prebuilt_backbone: an already-built backbone for that section (not saved), so that a
            runner shares one frozen model between its data encoding and the method.
        task: the task kind of the data (``adapt/tasks/``): its default loss and its metrics.
        task_options: its options from the data section (``Task.options_from``: a segmentation
            run's sliding window).
        class_text: the run's class text in plain form (``ClassText.to_plain``: the sentences
            themselves, so a checkpoint rebuilds its classifier without the files).
        class_tasks: the task of every class when several datasets train at once (multi_task);
            per_task: score each training image against its own task's classes only.
    """

    def __init__(self, method: str, method_config: Optional[dict], classnames: Sequence[str],
                 templates: Sequence[str], backbone: dict, optim: dict, max_epochs: int,
                 prebuilt_backbone=None, task: str = "single_label", task_options: Optional[dict] = None,
                 class_text: Optional[dict] = None, class_tasks: Optional[list[str]] = None,
                 per_task: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["prebuilt_backbone"])
        self.task = get_task(task, **(task_options or {}))
        bb = prebuilt_backbone if prebuilt_backbone is not None else build_backbone(BackboneConfig(**backbone))
        self.method: Method = build_method(method, method_config, bb, classnames, templates, task=self.task,
                                           class_text=ClassText.from_plain(class_text), class_tasks=class_tasks)
        # multi_task's per_task classifier: each training image is scored against its own task's
        # classes only (the task of class c: ``task_ids[c]``)
        self.task_ids = task_ids(class_tasks) if per_task else None
        self.optim_cfg = OmegaConf.create(dict(optim))
        group_overrides(self.method, self.optim_cfg)  # a group the method lacks: refused before training
        self.max_epochs = max_epochs
        # checkpoints hold only the method's trainable state; the backbone comes from its weights
        self.strict_loading = False
        # the task's running training metric (accuracy, mAP), logged as train/<name>
        self.train_metric = self.task.train_metric(len(self.method.classnames))
        self.eval_metric: Optional[Metric] = None  # the task's evaluator of the current split
        self.eval_results: dict[str, float] = {}  # its last split's metrics (fractions of 1)
        self._evaluated = 0  # targets seen by the current evaluator
        self.scalar_names: set[str] = set()  # the training scalars the method reported
        self.training_scalars: dict[str, float] = {}

    @classmethod
    def from_recipe(cls, recipe: DictConfig, classnames: Sequence[str], templates: Sequence[str],
                    method: Optional[str] = None, backbone=None,
                    max_epochs: Optional[int] = None, task: str = "single_label",
                    class_text: Optional[ClassText] = None,
                    class_tasks: Optional[Sequence[str]] = None) -> "AdaptModule":
        """The recipe's method (or ``method`` with its defaults) for ``classnames``;
        ``max_epochs``: the run's epochs when they follow from ``trainer.max_steps``;
        ``class_text``: the checked class text of ``data.class_text``; ``class_tasks``: the task of
        every class (multi_task), whose classifier the data section names."""
        plain = lambda section: OmegaConf.to_container(section, resolve=True)  # noqa: E731
        if method is None:
            section = plain(recipe.method)
            method = section.pop("name")
        else:
            section = None
        options = get_task(task).options_from(recipe.data)
        optim = plain(recipe.optim)
        if section is None:  # another method than the recipe's (the zero-shot baseline): its groups only
            optim.pop("groups", None)
        return cls(method, section, list(classnames), list(templates), plain(recipe.backbone),
                   optim, int(max_epochs or recipe.trainer.max_epochs),
                   prebuilt_backbone=backbone, task=task, task_options=options or None,
                   class_text=class_text.to_plain() if class_text is not None else None,
                   class_tasks=list(class_tasks) if class_tasks else None,
                   per_task=bool(class_tasks) and recipe.data.multi_task.classifier == "per_task")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None,
                             strict: Optional[bool] = None, weights_only: Optional[bool] = None,
                             **kwargs) -> "AdaptModule":
        """Lightning's, reading the file weights-only: a checkpoint carrying a pickle payload is
        refused with one message, never run (``weights_only=False`` loads one you trust)."""
        from adapt.checkpointing import refuse_pickles, weights_only_flag

        with refuse_pickles(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                 hparams_file=hparams_file, strict=strict,
                                                 weights_only=weights_only_flag(weights_only), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method(x)

    # ------------------------------------------------------------------ training ---------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.method.output(x)
        if self.task_ids is not None:
            out = dataclasses.replace(out, logits=own_task_logits(out.logits, y, self.task_ids.to(y.device)))
        loss = self.method.loss(out, y)
        self._check_finite(loss)
        self.train_metric(self.task.scores(out.logits.detach()), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=y.shape[0],
                 sync_dist=True)
        self.log(f"train/{self.task.primary}", self.train_metric, prog_bar=True, on_step=False, on_epoch=True)
        for name, value in out.scalars.items():  # the method's own terms: epoch means
            self.scalar_names.add(name)
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=y.shape[0],
                     sync_dist=True)
        return loss

    def final_scalars(self) -> dict[str, float]:
        """The method's scalars after fitting: the last epoch's mean of every training scalar,
        then the fitted method's own (``Method.scalars``)."""
        out = dict(self.training_scalars)
        out.update({k: float(v) for k, v in self.method.scalars().items()})
        return out

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss, before its backward pass can spoil the state.
        Under DDP the processes agree first, so that all of them stop at the same step."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise TrainingDiverged(
                f"training diverged: the loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}) with optim.lr={self.optim_cfg.lr}; lower optim.lr or set "
                "trainer.gradient_clip_val")

    def on_fit_start(self) -> None:
        rank_zero_info(parameter_summary(self.method))

    def on_train_start(self) -> None:
        # Lightning keeps whatever mode the module is in; a method evaluated before fitting
        # (e.g. a baseline pass) must train in train mode (its backbone stays in eval mode)
        self.method.train()

    def on_before_optimizer_step(self, optimizer) -> None:
        # after accumulation, the DDP all-reduce and fp16 unscaling; before clipping and the step
        self.method.transform_gradients(self._mean_over_processes)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # the steps taken before this one (Lightning counts it once the step is done)
        step = int(self.trainer.global_step)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.method.on_optimizer_step(step)

    def _mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    def on_train_epoch_start(self) -> None:
        self.method.on_train_epoch_start(self.current_epoch, self.max_epochs)

    def on_train_epoch_end(self) -> None:
        self.method.on_train_epoch_end(self.current_epoch, self.max_epochs)

    def on_fit_end(self) -> None:
        # the last epoch's means, kept before evaluation trainers replace the callback metrics
        metrics = self.trainer.callback_metrics
        self.training_scalars = {name: float(metrics[f"train/{name}"]) for name in sorted(self.scalar_names)
                                 if f"train/{name}" in metrics}
        self.method.on_fit_end()

    # ------------------------------------------------------------------ evaluation -------------
    def start_evaluation(self) -> None:
        """The task's fresh evaluator sized to the method's current class list; a test-time
        method starts every evaluation set with no adaptation state (a new stream)."""
        check_test_time_world(self.method, self.trainer.world_size)
        self.method.reset_test_state()
        self.eval_metric = self.task.evaluator_for(self.method.classnames).to(self.device)
        self._evaluated = 0

    def finish_evaluation(self, stage: str) -> None:
        """Every metric of the split (gathered across processes), logged as <stage>/<name>."""
        if not self._evaluated:
            return
        self.eval_results = self.eval_metric.compute()
        for name, value in self.eval_results.items():
            self.log(f"{stage}/{name}", value)

    def on_validation_epoch_start(self) -> None:
        self.start_evaluation()

    def on_test_epoch_start(self) -> None:
        self.start_evaluation()

    def on_validation_epoch_end(self) -> None:
        self.finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.finish_evaluation("test")

    def _eval_step(self, batch, stage: str):
        x, y = batch
        if self.method.test_time == "episodic":
            # one image at a time, state reset after each: no image's adaptation reaches another
            logits = torch.cat([self._predict_episode(xi) for xi in x.split(1)])
        else:  # online methods take the batch in stream order and update as they go
            logits = self.task.infer(self.method.predict, x)
        self.eval_metric.update(logits, y)
        self._evaluated += y.shape[0]

    def _predict_episode(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.method.predict(x)
        finally:
            self.method.reset_test_state()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ optimisation -----------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = optimizer_groups(self.method, cfg)
        if cfg.name == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.name == "adam":  # L2 in the gradient, as Dassl's "adam" (TaskRes)
            opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                   weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                    weight_decay=cfg.weight_decay)
        if cfg.interval == "step":
            total = int(self.trainer.estimated_stepping_batches)
            factor = step_lr_factor(cfg.scheduler, cfg.warmup_steps, cfg.min_lr / cfg.lr, total,
                                    cfg.get("poly_power", 0.9))
            epoch_of = steps_to_epochs(total, self.max_epochs)
        else:
            epoch_of = None
        # one factor per group: the recipe's schedule (with the group's own warm-up, if it has
        # one) times the method's own (``Method.lr_factor``)
        factors = [factor if cfg.interval == "step" else epoch_lr_factor(
            cfg.scheduler, group["warmup_epochs"], cfg.warmup_lr / cfg.lr, self.max_epochs) for group in params]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [group_lr_factor(f, self.method, group["name"], epoch_of) for f, group in zip(factors, params)])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": cfg.interval}}

    # ------------------------------------------------------------------ checkpoints ------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self.method.trainable_state()
        check_finite_state(state, "checkpoint")
        checkpoint["state_dict"] = {METHOD_PREFIX + k: v for k, v in state.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = {k[len(METHOD_PREFIX):]: v for k, v in checkpoint["state_dict"].items()
                 if k.startswith(METHOD_PREFIX)}
        self.method.load_trainable_state(state)


def check_test_time_world(method: Method, world_size: int) -> None:
    """An online method's predictions depend on the whole stream before each image; split over
    processes, the number would silently depend on the device count, so it is refused."""
    if method.test_time == "online" and world_size > 1:
        raise RuntimeError(
            f"{method.name} adapts online along the test stream, so its accuracy would depend on "
            f"how {world_size} processes split that stream; evaluate it on one device "
            "(trainer.devices=1 trainer.strategy=auto)")


def parameter_summary(method: Method) -> str:
    """What trains: the method's own parameters and, for methods that change the backbone, which
    backbone tensors (by the names the method declares in ``backbone_state``)."""
    own = sum(p.numel() for n, p in method.named_parameters() if p.requires_grad and not n.startswith("backbone."))
    owned = method.backbone_state()
    line = f"{method.name}: {own + sum(t.numel() for t in owned.values()):,} trainable parameters"
    if not owned:
        return line + " (backbone frozen)"
    towers: dict[str, int] = {}
    for name, t in owned.items():
        tower = method.backbone.tower_of(name.removeprefix("model.")) or "shared"
        towers[tower] = towers.get(tower, 0) + t.numel()
    parts = ", ".join(f"{k} tower {v:,}" for k, v in sorted(towers.items()))
    example = next(iter(owned))
    return f"{line}: method {own:,}; backbone {parts} in {len(owned)} tensors (e.g. {example})"


def default_precision(accelerator: str) -> str:
    """fp32 on CPU (bf16 matmuls are ~100x slower there); bf16 / fp16 autocast on GPUs."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_trainer(recipe: DictConfig, run_dir: Path, inference_mode: bool = True,
                  evaluation: bool = False, max_epochs: Optional[int] = None) -> pl.Trainer:
    """``max_epochs``: the run's epochs when they follow from ``trainer.max_steps``.
    ``evaluation=True`` for the evaluation passes after fitting:
    - no checkpoints (``adapt.checkpointing`` writes them while fitting);
    - no loggers: accuracies go to results.json (and through the fit's loggers, see
      ``log_final_metrics``); a logger per pass would overwrite the training log;
    Lightning's distributed sampler is never used: for evaluation it pads each rank's share with
    repeated images, which biases the accuracy (the runner gives each rank an unpadded share, and
    the synced micro accuracy sums them exactly); for training the data module splits every
    global batch across the processes itself (``adapt.data.sharding``)."""
    from omegaconf import OmegaConf

    from adapt.checkpointing import AtomicCheckpointIO, RunCheckpoints
    from adapt.loggers import build_loggers, progress_callbacks

    # the frozen backbone is kept in eval mode on purpose; Lightning warns about that
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", ".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    # few-shot epochs are often shorter than the logging interval; epoch means are logged anyway
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    t = recipe.trainer
    max_epochs = int(max_epochs or t.max_epochs)
    loggers = [] if evaluation else build_loggers(recipe, run_dir)
    callbacks = [] if evaluation else [RunCheckpoints(
        run_dir / "checkpoints", OmegaConf.to_container(recipe, resolve=True), max_epochs,
        every_n_epochs=t.checkpoint_every_n_epochs, every_minutes=t.checkpoint_every_minutes)]
    return pl.Trainer(
        max_epochs=max_epochs,
        max_steps=t.max_steps or -1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision or default_precision(t.accelerator),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        check_val_every_n_epoch=t.check_val_every_n_epoch or None,
        limit_val_batches=1.0 if t.check_val_every_n_epoch else 0,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=callbacks + progress_callbacks(t.progress_bar),
        enable_checkpointing=not evaluation,
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        # adapt shards its own loaders: training by global batch (adapt.data.sharding), evaluation
        # in unpadded shares
        use_distributed_sampler=False,
        inference_mode=inference_mode,
    )


def log_final_metrics(trainer: pl.Trainer, results: dict) -> None:
    """Write a run's final results through the loggers its training used, and close them."""
    from adapt.loggers import log_final

    log_final(trainer.loggers, results, step=trainer.global_step)
