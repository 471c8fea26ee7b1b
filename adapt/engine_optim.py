"""The optimizer's parameter groups and learning-rate schedules, built from the recipe's
``optim`` section and the method's ``param_groups`` / ``lr_factor`` (what
``AdaptModule.configure_optimizers`` hands Lightning)."""
from __future__ import annotations

import math
from typing import Optional

from adapt.methods import Method

__all__ = ["epoch_lr_factor", "group_lr_factor", "group_overrides", "optimizer_groups", "step_lr_factor",
           "steps_to_epochs"]


def optimizer_groups(method: Method, cfg) -> list[dict]:
    """The optimizer's parameter groups: the method's (``Method.param_groups``), each at the
    recipe's lr and weight decay times its multipliers, which ``optim.groups`` may override.
    Every group gets its own lr, so the schedule's factor scales them all alike."""
    groups = method.param_groups()
    overrides = group_overrides(method, cfg, groups)
    out = []
    for name, group in groups.items():
        scales = dict(overrides.get(name) or {})
        warmup = scales.get("warmup_epochs", group.warmup_epochs)
        out.append({"params": group.params, "name": name,
                    "lr": cfg.lr * scales.get("lr_scale", group.lr_scale),
                    "weight_decay": cfg.weight_decay * scales.get("weight_decay_scale", group.weight_decay_scale),
                    "warmup_epochs": cfg.get("warmup_epochs", 0) if warmup is None else int(warmup)})
    return out


def group_lr_factor(factor, method: Method, name: str, epoch_of=None):
    """The lr multiplier of group ``name`` at scheduler count ``i``: the schedule's ``factor(i)``
    times the method's ``lr_factor(name, epoch)``; ``epoch_of`` maps a step count to its epoch
    (interval=step), else the count is the epoch."""
    return lambda i: factor(i) * method.lr_factor(name, epoch_of(i) if epoch_of is not None else i)


def steps_to_epochs(total_steps: int, max_epochs: int):
    """The epoch of optimizer step ``i`` when ``total_steps`` are spread evenly over ``max_epochs``."""
    return lambda i: min(i * max_epochs // max(1, total_steps), max_epochs - 1)


def group_overrides(method: Method, cfg, groups: Optional[dict] = None) -> dict:
    """The recipe's ``optim.groups``, each naming one of the method's parameter groups."""
    groups = method.param_groups() if groups is None else groups
    overrides = dict(cfg.get("groups") or {})
    unknown = sorted(set(overrides) - set(groups))
    if unknown:
        raise ValueError(f"optim.groups names {', '.join(unknown)}, but {method.name}'s parameter groups "
                         f"are: {', '.join(groups)}; use those names or drop optim.groups")
    for name, group in groups.items():
        warmup = dict(overrides.get(name) or {}).get("warmup_epochs", group.warmup_epochs)
        if warmup is not None and cfg.get("interval", "epoch") == "step":
            raise ValueError(f"{method.name}'s parameter group {name} warms up for {warmup} epochs of its own, "
                             "but optim.interval=step schedules per step; use optim.interval=epoch")
    return overrides


def epoch_lr_factor(scheduler: str, warmup_epochs: int, warmup_factor: float, max_epochs: int):
    """lr multiplier per epoch, as CoOp's trainer schedules it: ``warmup_epochs`` at a constant
    small lr, then cosine annealing whose step count starts after warm-up, with period
    ``max_epochs`` (so the last epoch's lr stays above zero)."""

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_factor
        if scheduler == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max_epochs))

    return factor


def step_lr_factor(scheduler: str, warmup_steps: int, min_factor: float, total_steps: int,
                   poly_power: float = 0.9):
    """lr multiplier per optimizer step: a linear warm-up ``(s + 1) / warmup_steps`` (WiSE-FT's),
    then cosine from the full lr down to ``min_factor`` over the remaining steps (CLIP-LoRA's
    ``CosineAnnealingLR(total_iters, eta_min)`` when there is no warm-up).

    ``poly``: mmcv's poly policy, ``min + (1 - min) (1 - s / total) ** poly_power`` counted from
    step 0 over all ``total_steps`` (not from the warm-up's end), the warm-up multiplying it as
    mmcv's linear warm-up does (mmseg's iteration schedules: DenseCLIP's 80k, power 0.9)."""

    def poly(step: int) -> float:
        return min_factor + (1.0 - min_factor) * (1.0 - min(step, total_steps) / max(1, total_steps)) ** poly_power

    def factor(step: int) -> float:
        if scheduler == "poly":
            return poly(step) * ((step + 1) / warmup_steps if step < warmup_steps else 1.0)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))

    return factor
