"""Recipes: a YAML file + ``key=value`` overrides -> one typed, validated config.

OmegaConf structured configs type every section; the ``method`` section is validated against the
chosen method's own Config dataclass. Unknown keys, wrong types and unknown method names stop
with a message naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adapt.backbone_loading import BackboneConfig
from adapt.data.config import DataConfig
from adapt.settings import check_data
from adapt.methods.registry import config_dict, get_method, parse_method_section
from adapt.structured import RecipeError, check_choice, merge_checked

__all__ = ["Recipe", "RecipeError", "load_recipe", "method_config_of", "merge_checked", "resolve_recipe",
           "run_dir_of"]

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | constant (after warm-up) | poly (interval=step only)
    # scheduler=poly: mmcv's ``policy='poly'`` (mmseg's iteration schedules), the factor
    # ``(1 - s / total) ** poly_power`` from the full lr down to min_lr over all the run's steps
    poly_power: float = 0.9
    # epoch: the lr changes once per epoch (CoOp's trainer); step: once per optimizer step over
    # the run's total steps (CLIP-LoRA's and WiSE-FT's iteration schedules)
    interval: str = "epoch"
    # CoOp's warm-up (interval=epoch): the first epochs at a constant small lr, then the
    # schedule over max_epochs
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    # interval=step: a linear warm-up over the first steps (WiSE-FT: 500), then cosine down to
    # min_lr (CLIP-LoRA's eta_min 1e-6)
    warmup_steps: int = 0
    min_lr: float = 0.0
    # per parameter group of the method (``Method.param_groups``; a name it lacks is refused with
    # the list), multipliers of lr and weight_decay: e.g. ``groups: {norms: {lr_scale: 0.1}}`` (LASP's),
    # and its own warm-up epochs (``warmup_epochs``, interval=epoch; CAVPT's context warms up for 1)
    groups: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ("sgd", "adam", "adamw"))
        check_choice("optim.scheduler", self.scheduler, ("cosine", "constant", "poly"))
        if self.scheduler == "poly" and self.interval != "step":
            raise RecipeError("optim.scheduler=poly is an iteration schedule (mmseg's): set optim.interval=step "
                              "(with optim.warmup_epochs=0 and optim.warmup_steps for a warm-up)")
        if self.poly_power <= 0:
            raise RecipeError(f"optim.poly_power must be > 0, got {self.poly_power}")
        check_choice("optim.interval", self.interval, ("epoch", "step"))
        if self.lr <= 0:
            raise RecipeError(f"optim.lr must be > 0, got {self.lr}")
        if self.interval == "step" and self.warmup_epochs:
            raise RecipeError("optim.warmup_epochs counts epochs, but optim.interval=step schedules "
                              "per step: set optim.warmup_epochs=0 and use optim.warmup_steps")
        if self.interval == "epoch" and self.warmup_steps:
            raise RecipeError("optim.warmup_steps needs optim.interval=step (with interval=epoch, "
                              "use optim.warmup_epochs)")
        if not 0 <= self.min_lr < self.lr:
            raise RecipeError(f"optim.min_lr must be in [0, optim.lr), got {self.min_lr}")
        for name, scales in self.groups.items():
            keys = set(scales or {}) if isinstance(scales, (dict, DictConfig)) else None
            if keys is None or not keys <= {"lr_scale", "weight_decay_scale", "warmup_epochs"} or any(
                    not isinstance(v, (int, float)) or v < 0 for v in scales.values()):
                raise RecipeError(f"optim.groups.{name} must map lr_scale / weight_decay_scale / warmup_epochs "
                                  f"to numbers >= 0 (e.g. optim.groups.{name}.lr_scale=0.1), got {scales!r}")


@dataclass
class TrainerConfig:
    max_epochs: int = 200
    # train for this many optimizer steps instead (the epochs follow from the training set's
    # size); e.g. CLIP-LoRA's 500 per shot: max_steps: ${mul:500,${data.shots}}
    max_steps: Optional[int] = None
    accelerator: str = "auto"
    devices: Any = "auto"  # an int, a list of ids, or "auto"
    strategy: str = "auto"  # "ddp" for several GPUs
    num_nodes: int = 1  # machines, each running `devices` processes (SLURM / torchrun / env vars)
    # null: 32-true on CPU, bf16-mixed on GPUs that support it, else 16-mixed
    precision: Optional[str] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    progress_bar: bool = True
    # checkpoints/last.ckpt at epoch ends: every N epochs (null = four times per run), and at the
    # first epoch end after this many minutes of wall time (null = no time rule); and at the end
    checkpoint_every_n_epochs: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = 10.0
    # validate every N epochs on the few-shot val split (for logging; the last epoch is evaluated)
    check_val_every_n_epoch: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_steps, int) and self.max_steps <= 0:
            raise RecipeError(f"trainer.max_steps must be > 0 (or null for trainer.max_epochs), got {self.max_steps}")


@dataclass
class LoggerConfig:
    # Weights & Biases: recipe, per-epoch metrics, final results (run_dir/wandb)
    wandb: bool = False
    project: str = "adapt"  # wandb project
    mode: str = "offline"  # wandb mode: offline | online | disabled
    csv: bool = True  # run_dir/logs/metrics.csv
    tensorboard: bool = False  # run_dir/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class Recipe:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: Any = field(default_factory=lambda: {"name": "zeroshot"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 1
    # runs are written to output_dir/run_name; run_name null = method/dataset/setting/shotsK_seedS
    output_dir: str = "runs"
    run_name: Optional[str] = None
    # continue the run in the run directory from its checkpoints/last.ckpt (same recipe; only
    # trainer.max_epochs may grow)
    resume: bool = False
    # a run directory that holds a run is refused unless this is true: then the old run is moved
    # aside to <name>.replaced-<time> (never deleted) and the new one starts
    overwrite: bool = False
    # start training from the mean trained state of these runs (run directories or adapter
    # folders of the same method): MVLPT's transfer from multi-task source runs (adapt/warm_start.py)
    warm_start: list[str] = field(default_factory=list)
    # also evaluate the zero-shot model on the same sets and report it beside the method
    baseline: bool = False
    # train and evaluate on cached frozen image features where the method allows it (its image
    # encoder is frozen and outside the trained path); see data.cache_views / data.cache_dir
    cache: bool = True


# recipes may scale a number by others, e.g. trainer.max_steps: ${mul:500,${data.shots}}
def _mul(*xs):  # unannotated: OmegaConf checks annotations, and ints and floats both come
    return math.prod(xs)


OmegaConf.register_resolver("mul", _mul, replace=True)


def load_recipe(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Read a recipe (following ``_base_`` includes: one path or a list), apply overrides, validate
    everything."""
    layers = [_read_yaml(Path(path))] if path is not None else []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} has no '=': overrides are key=value, e.g. "
                              f"{item.split('=')[0] or 'data.shots'}=4")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise RecipeError(f"cannot parse overrides {list(overrides)}: {err}. Use key=value.") from None
    if layers:
        layers[0] = _switch_method(layers[0], OmegaConf.select(cli, "method.name"))
    return resolve_recipe(*layers, cli)


def _switch_method(recipe: DictConfig, new_name: Optional[str]) -> DictConfig:
    """``method.name=other`` on the command line: keep the recipe's method settings that the other
    method also has (n_ctx, ctx_init, ...) and drop the rest, which belong to the recipe's own
    method. Keys given on the command line are still checked strictly."""
    old_name = OmegaConf.select(recipe, "method.name")
    if new_name is None or old_name is None or new_name == old_name:
        return recipe
    try:
        valid = {f.name for f in dataclasses.fields(get_method(new_name).Config)}
    except KeyError as err:
        raise RecipeError(f"method.name: {err.args[0]}") from None
    kept = {k: v for k, v in recipe.method.items() if k == "name" or k in valid}
    dropped = sorted(set(recipe.method.keys()) - set(kept))
    if dropped:
        log.info("method.name=%s replaces the recipe's %s; not carried over: %s", new_name, old_name,
                 ", ".join(dropped))
    recipe = recipe.copy()
    recipe.method = kept
    return recipe


def resolve_recipe(*layers) -> DictConfig:
    recipe = merge_checked(OmegaConf.structured(Recipe), OmegaConf.merge(*layers) if layers else {},
                           "recipe", Recipe)
    try:
        check_data(recipe.data)
    except ValueError as err:
        raise RecipeError(f"recipe: {err}") from None
    recipe = OmegaConf.structured(recipe)
    section = recipe.method
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    # the one parse of the method section: typed and validated against the method's Config;
    # the recipe keeps it as plain data (it is saved as YAML and rebuilt from checkpoints)
    name, typed = parse_method_section(section)
    recipe.method = {"name": name, **config_dict(typed)}
    return recipe


def method_config_of(recipe: DictConfig):
    """The typed Config of a resolved recipe's method."""
    return parse_method_section(OmegaConf.to_container(recipe.method, resolve=True))[1]


def _read_yaml(path: Path, included_by: Optional[Path] = None) -> DictConfig:
    if not path.is_file():
        if included_by is not None:
            raise RecipeError(f"recipe {str(included_by)!r} includes _base_: {path.name!r}, which was "
                              f"not found (looked for {str(path.resolve())!r}; _base_ is relative to "
                              "the including recipe's folder)")
        raise RecipeError(f"recipe file {str(path)!r} not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"recipe {str(path)!r} is a YAML {type(cfg).__name__.replace('Config', '').lower()}, "
                          "but a recipe is a mapping of sections (backbone:, method:, data:, optim:, "
                          "trainer:, ...), e.g. 'method: {name: coop}'")
    base = cfg.pop("_base_", None)
    if base is None:
        return cfg
    # one file or a list (a method recipe + a data recipe, e.g. recipes/data/<dataset>.yaml);
    # later files and then this one win
    bases = [base] if isinstance(base, str) else list(base)
    return OmegaConf.merge(*[_read_yaml(path.parent / b, included_by=path) for b in bases], cfg)


def epochs_of(recipe: DictConfig, n_train: int) -> int:
    """The run's epochs: ``trainer.max_epochs``, or, with ``trainer.max_steps``, as many as those
    steps take on ``n_train`` training images (global batches of ``data.batch_size``, a ragged
    last batch dropped, ``accumulate_grad_batches`` per optimizer step)."""
    t = recipe.trainer
    if t.max_steps is None:
        return int(t.max_epochs)
    bs = recipe.data.batch_size
    batches = max(1, n_train // bs) if n_train > bs else 1
    return max(1, math.ceil(t.max_steps / math.ceil(batches / t.accumulate_grad_batches)))


def run_dir_of(recipe: DictConfig) -> Path:
    name = recipe.run_name or (f"{recipe.method.name}/{recipe.data.dataset}/{recipe.data.setting}/"
                               f"shots{recipe.data.shots}_seed{recipe.seed}")
    return Path(recipe.output_dir) / name
