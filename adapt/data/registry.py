"""Datasets registered by short name; a recipe's ``data.dataset`` is one of these keys.

A loader is a plain function ``(cfg: DataConfig) -> DatasetSplits``. Loaders register themselves
on import; the built-in modules are imported lazily on the first lookup so that reading a recipe
does not pay for the generated world's imports.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from adapt.data.config import DataConfig
from adapt.data.items import DatasetSplits

Loader = Callable[[DataConfig], DatasetSplits]

_LOADERS: dict[str, Loader] = {}
# modules whose import registers loaders; the world package is optional (an install may drop it)
_BUILTIN_MODULES = ("adapt.data.folder", "adapt.data.multilabel", "adapt.data.segmentation", "adapt.data.benchmark",
                    "adapt.data.imagenet", "adapt.data.mnist", "adapt.data.cifar", "adapt.data.world.datasets")
_builtins_loaded = False


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: ``@register_dataset("imagefolder")`` on a loader function."""

    def wrap(fn: Loader) -> Loader:
        old = _LOADERS.get(name)
        # re-running the same definition (a module reload) is harmless; two different loaders
        # under one name would make the recipe ambiguous
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"dataset {name!r} is registered twice ({old.__module__} and {fn.__module__})")
        _LOADERS[name] = fn
        return fn

    return wrap


def register_table_entry(name: str, load: Callable[[Any, DataConfig], DatasetSplits], entry: Any,
                         doc: str) -> Loader:
    """Register ``load(entry, cfg)`` as dataset ``name``: one loader per entry of a module's table
    of datasets (the CoOp benchmarks, the two CIFARs), each under its own function name and
    docstring, so that a loader reads as if written out."""
    def loader(cfg: DataConfig) -> DatasetSplits:
        return load(entry, cfg)

    loader.__name__ = loader.__qualname__ = f"load_{name}"
    loader.__module__, loader.__doc__ = load.__module__, doc
    return register_dataset(name)(loader)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # set first: a loader may call build_dataset while its module imports
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise  # a real missing dependency inside the module, not an absent module


def list_datasets() -> list[str]:
    _load_builtins()
    return sorted(_LOADERS)


def get_dataset(name: str) -> Loader:
    """The loader registered as ``name``; an unknown name names the closest registered one."""
    _load_builtins()
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, list(_LOADERS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r} (data.dataset).{hint} "
                         f"Registered: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name]


def build_dataset(cfg: DataConfig) -> DatasetSplits:
    splits = get_dataset(cfg.dataset)(cfg)
    if not isinstance(splits, DatasetSplits):
        raise TypeError(f"dataset loader {cfg.dataset!r} returned {type(splits).__name__}, "
                        f"expected DatasetSplits")
    return splits
