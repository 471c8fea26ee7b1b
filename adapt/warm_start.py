"""``warm_start``: start training from the trained state of earlier runs, averaged (MVLPT's
second stage: prompts learned on several source tasks, averaged over the source's seeds by its
``scripts/avg_ckpt.py``, initialise a target task's few-shot training).

Each entry is a run directory or an adapter folder of the same method. Floating-point tensors
are averaged element-wise; any other tensor must be equal in every source. The sources are
checked when the run is set up, before the backbone loads; their tensors must fit the method as
the recipe builds it (a class-specific context learned for other classes does not).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from adapt.config import RecipeError
from adapt.methods.adapters import WEIGHTS_FILE, AdapterError, read_adapter_meta, read_adapter_state


def source_adapters(paths: Sequence[str], method: str) -> list[Path]:
    """The adapter folder of every ``warm_start`` entry, each a finished run of ``method``."""
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        adapter = path if (path / WEIGHTS_FILE).is_file() else path / "adapter"
        if not (adapter / WEIGHTS_FILE).is_file():
            raise RecipeError(f"warm_start: {path} holds no trained adapter ({WEIGHTS_FILE}); train the source "
                              f"first (e.g. `adapt fit <source recipe>`) and name its run directory")
        try:
            meta = read_adapter_meta(adapter)
        except AdapterError as err:
            raise RecipeError(f"warm_start: {err}") from None
        if meta["method"] != method:
            raise RecipeError(f"warm_start: {path} is a {meta['method']} run, but this recipe trains {method}; "
                              f"start from runs of the same method")
        out.append(adapter)
    return out


def averaged_state(adapters: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the sources' trained tensors."""
    states = [read_adapter_state(a) for a in adapters]
    keys = set(states[0])
    for adapter, state in zip(adapters[1:], states[1:]):
        if set(state) != keys:
            raise RecipeError(f"warm_start: {adapter} holds other tensors than {adapters[0]} "
                              f"({sorted(set(state) ^ keys)[:4]}); average runs of one recipe")
    out = {}
    for key in sorted(keys):
        values = [s[key] for s in states]
        if any(v.shape != values[0].shape for v in values):
            raise RecipeError(f"warm_start: {key} has different shapes in the sources "
                              f"({[tuple(v.shape) for v in values]}); average runs of one recipe")
        if values[0].is_floating_point():
            out[key] = torch.stack([v.float() for v in values]).mean(0).to(values[0].dtype)
        elif all(torch.equal(v, values[0]) for v in values):
            out[key] = values[0]
        else:
            raise RecipeError(f"warm_start: {key} (not a float tensor) differs between the sources")
    return out


def warm_start(method, adapters: Sequence[Path]) -> None:
    """Load the sources' mean into ``method``'s trainable state (one message where it does not fit)."""
    state = averaged_state(adapters)
    try:
        method.load_trainable_state(state)
    except ValueError as err:
        raise RecipeError(f"warm_start: the sources' state does not fit this {method.name}: {err}") from None
