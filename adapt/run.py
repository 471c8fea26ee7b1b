"""One experiment, end to end: recipe -> backbone, data, method -> fit -> evaluate -> run directory.

A run directory holds ``recipe.yaml`` (resolved), ``manifest.json`` (the exact images),
``results.json``, ``adapter/`` and ``checkpoints/``.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional

import open_clip
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from adapt.version import __version__
from adapt.backbone import build_backbone
from adapt.checkpointing import RunCheckpoints
from adapt.config import RecipeError, epochs_of, run_dir_of
from adapt.datamodule import AdaptDataModule
from adapt.data.sharding import global_batch_message, shard_loader, stream_loader
from adapt.engine import AdaptModule, TrainingDiverged, build_trainer, log_final_metrics
from adapt.export import WEIGHTS_FILE, read_adapter_state, save_adapter
from adapt.io import atomic_write_json, atomic_write_text
from adapt.loggers import build_loggers, log_final
from adapt.methods import Method, get_method
from adapt.methods.registry import check_class_text, check_task
from adapt.data.class_text import load_class_text
from adapt.tasks import get_task
from adapt.process import prepare_cpu_process
from adapt.rundir import prepare_run_dir, resumable_checkpoint, write_status
from adapt.settings import get_setting
from adapt.warm_start import source_adapters, warm_start

log = logging.getLogger(__name__)


class Experiment:
    """The objects of one recipe, built once: backbone, data module, method, Lightning module."""

    def __init__(self, recipe: DictConfig, run_dir: Optional[Path] = None, evaluation: bool = False,
                 resume_from: Optional[Path] = None):
        """``evaluation``: re-evaluating a finished run, which writes only its own results file
        (never the run's manifest). ``resume_from``: the checkpoint ``fit`` continues from."""
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else run_dir_of(recipe)
        self.resume_from = resume_from
        if not evaluation:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        pl.seed_everything(recipe.seed, workers=True, verbose=False)
        # the data first: local paths and files are checked before any weights are loaded
        self.data = AdaptDataModule(recipe.data, None, None, None, seed=recipe.seed,
                                    run_dir=None if evaluation else self.run_dir)
        self.data.setup()
        try:  # the method must do this data's task kind: refused before the backbone loads
            check_task(recipe.method.name, self.data.dataset.task, recipe.data)
            # and learn from what the setting gives it (no label at all: unlabelled data)
            self.data.setting.check_method(self.data.cfg, get_method(recipe.method.name))
            kind = get_task(self.data.dataset.task, **get_task(self.data.dataset.task).options_from(recipe.data))
            # its data options (a class tree) must fit every class the run meets
            met = list(self.data.train_classnames)
            met += [c for names, _ in self.data.eval_sets.values() for c in names if c not in met]
            kind.check_classes(met)
            # descriptions / descriptors of every class met, checked before the backbone loads
            self.class_text = load_class_text(recipe.data.class_text, met)
            check_class_text(recipe.method.name, self.class_text)
            # the runs a warm start averages, found before the backbone loads
            self.warm_start = source_adapters(list(recipe.warm_start), recipe.method.name)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        self.max_epochs = epochs_of(recipe, len(self.data.train_items))
        self.backbone = build_backbone(recipe.backbone)
        self.data.set_preprocess(self.backbone.image_size, self.backbone.image_mean, self.backbone.image_std)
        self.data.use_feature_cache = bool(recipe.cache)
        # the setting's work that needs the model (UPL's pseudo-labels), before the method exists
        self.setting_report = self.data.setting.prepare(self.data, self.backbone, _encode_device(recipe))
        self.task = self.data.dataset.task
        self.module = AdaptModule.from_recipe(recipe, self.data.train_classnames, self.data.templates,
                                              backbone=self.backbone, max_epochs=self.max_epochs,
                                              task=self.task, class_text=self.class_text,
                                              class_tasks=self.data.class_tasks)
        self.task_metrics: dict[str, dict[str, float]] = {}  # per set, all of the task's metrics
        self.method: Method = self.module.method
        others = [n for n, (c, _) in self.data.eval_sets.items() if list(c) != list(self.data.train_classnames)]
        if others and not self.method.repointable:
            fix = f" or {self.method.repoint_fix}" if self.method.repoint_fix else ""
            raise ValueError(
                f"{recipe.method.name} (as configured) learns one thing per training class and "
                f"cannot classify the novel classes of evaluation set(s) {', '.join(others)} "
                f"(data.setting={recipe.data.setting}); use data.setting=all{fix}")
        check_scores_names(self.method, self.module.task, self.data.eval_sets)
        self.inputs = self.serve(self.method)
        self.fit_trainer: Optional[pl.Trainer] = None  # kept for its loggers

    def serve(self, method: Method) -> str:
        """Point the data module's loaders at ``method``'s inputs: cached frozen image features
        (pooled, or the dense outputs it reads) where the method only reads those, else images."""
        views = min(self.recipe.data.cache_views, max(1, self.max_epochs))
        return self.data.serve(method, self.backbone, cache=bool(self.recipe.cache), views=views,
                               device=_encode_device(self.recipe))

    def trainer(self, evaluation: bool = False) -> pl.Trainer:
        return build_trainer(self.recipe, self.run_dir, inference_mode=self.method.inference_mode_ok,
                             evaluation=evaluation, max_epochs=self.max_epochs)

    def setup_method(self) -> None:
        """The method's own preparation (Tip-Adapter's cache, ...) on the device it will run
        on: Lightning moves the module only when fitting or testing starts."""
        self.method.to(_encode_device(self.recipe))
        self.method.setup(self.data)

    def fit(self) -> float:
        """Train (if the method trains); returns wall seconds. Resumes from the last checkpoint
        when the recipe says ``resume: true``; starts from the ``warm_start`` runs' mean state."""
        self.setup_method()
        if not self.method.is_trainable:
            return 0.0
        if self.warm_start:  # a resumed run's checkpoint then replaces it, as it should
            warm_start(self.method, self.warm_start)
        start = time.perf_counter()
        self.fit_trainer = self.trainer()
        world = self.fit_trainer.world_size
        if self.recipe.data.batch_size % world:  # before any feature is encoded
            raise RecipeError(global_batch_message(self.recipe.data.batch_size, world))
        guard = next(c for c in self.fit_trainer.callbacks if isinstance(c, RunCheckpoints))
        try:
            self.fit_trainer.fit(self.module, datamodule=self.data,
                                 ckpt_path=str(self.resume_from) if self.resume_from else None)
        except TrainingDiverged as err:
            last = (f"the last good checkpoint is {guard.path} (after epoch {guard.saved_epoch})"
                    if guard.saved_epoch else "no checkpoint was written before it")
            _write_status(self, "diverged", message=str(err))
            raise TrainingDiverged(f"{err}; {last}. No adapter was written.") from None
        except (KeyboardInterrupt, SystemExit, SIGTERMException):
            if guard.interrupted is None:
                raise
            _write_status(self, "interrupted", message=str(guard.interrupted))
            raise guard.interrupted from None
        return time.perf_counter() - start

    def evaluate(self) -> dict[str, float]:
        """Accuracy (%) on every evaluation set; the method is re-pointed at each set's classes
        (novel prompts are rebuilt from the novel class names) and restored afterwards."""
        trained_on, templates = list(self.method.classnames), list(self.method.templates)
        trained_tasks = self.method.class_tasks
        trainer = self.trainer(evaluation=True)
        accs = {}
        loaders = self.data.test_dataloader()
        for (name, (classnames, _)), loader in zip(self.data.eval_sets.items(), loaders):
            # a cross-dataset target brings its own hand-written template(s)
            self.method.templates = list(self.data.eval_templates.get(name, templates))
            # the task may score more names than the classes (a class tree's internal nodes); a
            # multi-task run's set is one task's classes
            names = self.module.task.evaluation_classes(classnames)
            task = self.data.eval_tasks.get(name)
            self.method.set_classnames(names, [task] * len(names) if task else None)
            if self.method.test_time == "online":  # the whole set, in the seed's order
                loader = stream_loader(loader, self.recipe.seed)
            else:  # under DDP each process takes an unpadded share (Lightning's sampler is off here)
                loader = shard_loader(loader, trainer.global_rank, trainer.world_size)
            trainer.test(self.module, dataloaders=loader, verbose=False)
            # the task's primary metric names the set's result; all of them are kept
            found = {k: 100.0 * v for k, v in self.module.eval_results.items()}
            accs[name] = found[self.module.task.primary]
            self.task_metrics[name] = found
        self.method.templates = templates
        self.method.set_classnames(trained_on, trained_tasks)
        return accs

    def sweep(self, name: str, values, apply, chosen) -> dict:
        """The setting's metrics at each of ``values`` (the method's ``evaluation_sweep``); the
        chosen value is applied again afterwards. Reported only: nothing is selected on test."""
        rows = []
        try:
            for value in values:
                apply(value)
                rows.append({name: value, "metrics": summarize(self.recipe.data.setting, self.evaluate(),
                                                               self.module.task.primary)})
        finally:
            apply(chosen)
        return {"name": name, "chosen": chosen, "values": rows}


def check_scores_names(method: Method, task, eval_sets) -> None:
    """Where the task evaluates over more names than a set's classes (a class tree's nodes), the
    method must score names it was not trained on, each independently of the others in its
    list, with no test-time state: otherwise its leaf accuracy would change and its node
    scores would mean nothing. Refused before any training time is spent."""
    extended = [name for name, (c, _) in eval_sets.items() if task.evaluation_classes(c) != list(c)]
    if not extended:
        return
    why = method.names_not_scored_alone()
    if why:
        fix = f" (or {method.repoint_fix})" if method.repoint_fix and not method.repointable else ""
        raise RecipeError(f"data.hierarchy: the hierarchical metrics score the tree's internal nodes by name, "
                          f"and {method.name} (as configured) {why}; drop data.hierarchy{fix}")


def _encode_device(recipe: DictConfig) -> torch.device:
    """Where cached features are computed: this process's GPU when training runs on GPUs."""
    if recipe.trainer.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def summarize(setting: str, accs: dict[str, float], metric: str = "acc") -> dict[str, float]:
    """Accuracies per evaluation set -> the setting's named metrics (adapt/settings/)."""
    return get_setting(setting).summarize(accs, metric)


def run_fit(recipe: DictConfig) -> dict:
    prepare_cpu_process(recipe.trainer.accelerator)
    run_dir = run_dir_of(recipe)
    # before anything is built: never land on a finished run, never resume another recipe. Under
    # DDP the other processes start once rank zero has done this (and written into run_dir).
    if rank_zero_only.rank == 0:
        resume_from = prepare_run_dir(recipe, run_dir)
    else:
        resume_from = resumable_checkpoint(run_dir) if recipe.resume else None
    exp = Experiment(recipe, run_dir, resume_from=resume_from)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this function
        atomic_write_text(exp.run_dir / "recipe.yaml", OmegaConf.to_yaml(recipe))
    _write_status(exp, "running")
    fit_s = exp.fit()
    start = time.perf_counter()
    metrics = summarize(recipe.data.setting, exp.evaluate(), exp.module.task.primary)
    results = _results(recipe, exp, metrics, fit_s, time.perf_counter() - start)
    results["scalars"] = exp.module.final_scalars()
    sweep = exp.method.evaluation_sweep()
    if sweep is not None:
        results["sweep"] = exp.sweep(*sweep)
    # a training-free method (zero-shot, MaskCLIP, CALIP, CuPL, ...) gets a config-only adapter:
    # its class names, templates, class text and settings, so `adapt predict` and load_adapter
    # serve it like any other; test-time methods adapt while they evaluate and have none
    if exp.method.trainable_state() or not exp.method.test_time:
        adapter_dir = exp.run_dir / "adapter"
        if rank_zero_only.rank == 0:
            save_adapter(exp.method, adapter_dir)
        results["adapter_dir"] = str(adapter_dir)
    if recipe.baseline and exp.method.name != "zeroshot" and exp.task in get_method("zeroshot").tasks:
        results["zeroshot_metrics"] = zero_shot_metrics(exp)
    _write_results(exp, results)
    if exp.fit_trainer is not None:
        log_final_metrics(exp.fit_trainer, results)
    elif rank_zero_only.rank == 0:  # nothing trained: the loggers still get the recipe and results
        log_final(build_loggers(recipe, exp.run_dir), results)
    _write_status(exp, "finished")
    return results


def run_test(recipe: DictConfig, run_dir: Optional[Path] = None) -> dict:
    """Evaluate a recipe, or a finished run (its adapter is loaded) when ``run_dir`` is given:
    then only ``test_results.json`` is written into it."""
    prepare_cpu_process(recipe.trainer.accelerator)
    exp = Experiment(recipe, run_dir, evaluation=run_dir is not None)
    exp.setup_method()
    adapter = exp.run_dir / "adapter" / WEIGHTS_FILE
    if run_dir is not None and adapter.is_file():
        exp.method.load_trainable_state(read_adapter_state(adapter.parent))
    elif exp.method.is_trainable:
        log.warning("%s: no trained adapter found, evaluating the untrained initialisation", exp.method.name)
    start = time.perf_counter()
    metrics = summarize(recipe.data.setting, exp.evaluate(), exp.module.task.primary)
    results = _results(recipe, exp, metrics, 0.0, time.perf_counter() - start)
    results["scalars"] = exp.module.final_scalars()
    _write_results(exp, results, name="test_results.json" if run_dir is not None else "results.json")
    return results


def zero_shot_metrics(exp: Experiment) -> dict[str, float]:
    """The zero-shot model on the same evaluation sets, for a side-by-side comparison."""
    zs = AdaptModule.from_recipe(exp.recipe, exp.data.train_classnames, exp.data.templates,
                                 method="zeroshot", backbone=exp.backbone, task=exp.task,
                                 class_tasks=exp.data.class_tasks)
    saved, saved_module, saved_metrics = exp.method, exp.module, exp.task_metrics
    exp.method, exp.module, exp.task_metrics = zs.method, zs, {}
    try:  # zero-shot's own inputs (pooled features where the method read dense ones), then back
        exp.serve(zs.method)
        return summarize(exp.recipe.data.setting, exp.evaluate(), zs.task.primary)
    finally:
        exp.method, exp.module, exp.task_metrics = saved, saved_module, saved_metrics
        exp.serve(saved)


def _results(recipe: DictConfig, exp: Experiment, metrics: dict, fit_s: float, eval_s: float) -> dict:
    return {
        "method": recipe.method.name,
        "dataset": recipe.data.dataset,
        "setting": recipe.data.setting,
        "shots": recipe.data.shots,
        "seed": recipe.seed,
        "backbone": {"name": recipe.backbone.name, "pretrained": recipe.backbone.pretrained},
        "metrics": metrics,
        **exp.setting_report,  # e.g. UPL's pseudo-label accuracy (never used for training)
        "trainable_params": sum(p.numel() for p in exp.method.trainable_parameters()),
        "classes": {name: len(c) for name, (c, _) in exp.data.eval_sets.items()},
        # training images per class as sampled (fewer than "shots" with data.allow_fewer_shots)
        "train_counts": exp.data.train_counts,
        "skipped_images": exp.data.skipped_images,
        "run_dir": str(exp.run_dir),
        "timing": {"fit_seconds": round(fit_s, 3), "eval_seconds": round(eval_s, 3)},
        "inputs": exp.inputs,  # "features": trained/evaluated on cached frozen image features
        "task": exp.task,
        # every metric of the task per evaluation set, where it reports more than one (mAP, CF1, ...)
        **({"task_metrics": exp.task_metrics} if any(len(m) > 1 for m in exp.task_metrics.values()) else {}),
        **test_time_record(exp.method, recipe.seed),
        "versions": {"adapt": __version__, "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "python": platform.python_version()},
    }


def test_time_record(method: Method, seed: int) -> dict:
    """How a test-time method met the test set: episodic, or online along the stream of ``seed``."""
    if not method.test_time:
        return {}
    record = {"mode": method.test_time}
    if method.test_time == "online":
        record["stream_seed"] = int(seed)
    return {"test_time": record}


def _write_results(exp: Experiment, results: dict, name: str = "results.json") -> None:
    if rank_zero_only.rank == 0:
        atomic_write_json(exp.run_dir / name, results)


def _write_status(exp: Experiment, state: str, **extra) -> None:
    if rank_zero_only.rank == 0:
        write_status(exp.run_dir, state, **extra)
