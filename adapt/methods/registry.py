"""Methods registered by short lowercase name, as open_clip / timm / peft key their models."""
from __future__ import annotations

import difflib
from typing import Sequence

from omegaconf import OmegaConf

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("coop")`` on a ``Method`` subclass with a ``Config``."""

    def wrap(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if not hasattr(cls, "Config"):
            raise TypeError(f"method {name!r} needs a Config dataclass attribute")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Registered: {', '.join(list_methods())}")
    return _METHODS[name]


def method_config(name: str, overrides: dict | None = None):
    """The method's Config dataclass filled from ``overrides`` (typed, validated)."""
    from adapt.config import merge_checked  # local import: config imports this module

    cls = get_method(name).Config
    return merge_checked(OmegaConf.structured(cls), overrides or {}, f"method ({name})", cls)


def build_method(name: str, config, backbone, classnames: Sequence[str], templates: Sequence[str]):
    if config is None or isinstance(config, dict):
        config = method_config(name, config)
    return get_method(name)(config, backbone, classnames, templates)
