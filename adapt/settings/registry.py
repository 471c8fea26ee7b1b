"""Settings registered by short name; a recipe's ``data.setting`` is one of these keys."""
from __future__ import annotations

import difflib
from typing import Callable

_SETTINGS: dict[str, type] = {}


def register_setting(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_setting("base2novel")`` on a ``Setting`` subclass."""

    def wrap(cls: type) -> type:
        old = _SETTINGS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"setting {name!r} is registered twice ({old.__module__} and {cls.__module__})")
        cls.name = name
        _SETTINGS[name] = cls
        return cls

    return wrap


def list_settings() -> list[str]:
    """The registered settings (``adapt.settings`` registers the built-in ones on import)."""
    return sorted(_SETTINGS)


def get_setting(name: str):
    """A fresh instance of the setting registered as ``name``."""
    known = list_settings()
    if name not in _SETTINGS:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"data.setting={name!r} is not a known setting.{hint} Known: {', '.join(known)}")
    return _SETTINGS[name]()
