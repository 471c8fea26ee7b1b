"""Recipes: a YAML file + ``key=value`` overrides -> one typed, validated config.

OmegaConf structured configs type every section; the ``method`` section is validated against the
chosen method's own Config dataclass. Unknown keys, wrong types and unknown method names stop
with a message naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from adapt.backbone_loading import BackboneConfig
from adapt.data.config import DataConfig

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | constant (per epoch, after warm-up)
    # CoOp's warm-up: the first epochs at a constant small lr, then the schedule over max_epochs
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("sgd", "adamw"))
        _check_choice("optim.scheduler", self.scheduler, ("cosine", "constant"))
        if self.lr <= 0:
            raise RecipeError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class TrainerConfig:
    max_epochs: int = 200
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


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "adapt"
    mode: str = "offline"  # wandb mode: offline | online | disabled
    csv: bool = True


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
    # also evaluate the zero-shot model on the same sets and report it beside the method
    baseline: bool = False
    # train and evaluate on cached frozen image features where the method allows it (its image
    # encoder is frozen and outside the trained path); see data.cache_views / data.cache_dir
    cache: bool = True


def load_recipe(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Read a recipe (following ``_base_`` includes), apply overrides, validate everything."""
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
    from adapt.methods import get_method

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
    recipe = OmegaConf.structured(recipe)
    from adapt.methods import get_method, method_config

    method = OmegaConf.to_container(recipe.method) if isinstance(recipe.method, DictConfig) else recipe.method
    if not isinstance(method, dict) or "name" not in method:
        raise RecipeError("the recipe's method section needs a name, e.g. method: {name: coop}")
    method = dict(method)
    name = method.pop("name")
    try:
        get_method(name)
    except KeyError as err:
        raise RecipeError(f"method.name: {err.args[0]}") from None
    typed = method_config(name, method)
    recipe.method = {"name": name, **dataclasses.asdict(typed)}
    return recipe


def method_config_of(recipe: DictConfig):
    """The typed Config dataclass of a resolved recipe's method."""
    from adapt.methods import method_config

    section = dict(OmegaConf.to_container(recipe.method, resolve=True))
    return method_config(section.pop("name"), section)


def merge_checked(base: DictConfig, override, where: str, cls: type):
    """``OmegaConf.merge`` + ``to_object`` with errors rewritten to name the key and a fix."""
    try:
        merged = OmegaConf.merge(base, override)
        return OmegaConf.to_object(merged)
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise RecipeError(_unknown_key_message(err, base, where)) from None
    except ValidationError as err:
        key = getattr(err, "full_key", "") or "?"
        raise RecipeError(f"{where}: wrong type for {key!r}: {err.msg.splitlines()[0]}") from None
    except (ValueError, TypeError) as err:  # a Config's __post_init__ check
        raise RecipeError(f"{where}: {err}") from None


def _unknown_key_message(err, base: DictConfig, where: str) -> str:
    full_key = getattr(err, "full_key", None) or str(getattr(err, "key", "?"))
    parts = str(full_key).split(".")
    node = base
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    valid = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.5)
    hint = f" Did you mean {'.'.join(parts[:-1] + [close[0]])!r}?" if close else ""
    return f"{where}: unknown key {full_key!r}.{hint} Valid keys here: {', '.join(valid)}"


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
    return OmegaConf.merge(_read_yaml(path.parent / base, included_by=path), cfg)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{key}={value!r} is not one of {', '.join(choices)}.{hint}")


def run_dir_of(recipe: DictConfig) -> Path:
    name = recipe.run_name or (f"{recipe.method.name}/{recipe.data.dataset}/{recipe.data.setting}/"
                               f"shots{recipe.data.shots}_seed{recipe.seed}")
    return Path(recipe.output_dir) / name
