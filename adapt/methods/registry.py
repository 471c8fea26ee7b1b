"""Methods registered by short lowercase name, as open_clip / timm / peft key their models.

``method_config`` is the one place a method's section (a recipe's ``method:``, an adapter's
``method_config``) becomes its typed, validated Config.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from adapt.structured import RecipeError, merge_checked

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("coop")`` on a ``Method`` subclass with a ``Config``."""

    def wrap(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if not hasattr(cls, "Config"):
            raise TypeError(f"method {name!r} needs a Config dataclass attribute")
        if cls.changes_backbone and cls.supports_feature_cache:
            raise TypeError(f"method {name!r} changes the backbone, so its image features cannot "
                            "come from the frozen-feature cache (supports_feature_cache=False)")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def unregister_method(name: str) -> None:
    """Remove a registration (tests that register a method of their own clean up with this)."""
    _METHODS.pop(name, None)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Registered: {', '.join(list_methods())}")
    return _METHODS[name]


def method_config(name: str, overrides: Optional[Mapping[str, Any]] = None):
    """The method's Config dataclass filled from ``overrides`` (typed, validated); a Config
    instance is returned as it is."""
    cls = get_method(name).Config
    if isinstance(overrides, cls):
        return overrides
    return merge_checked(OmegaConf.structured(cls), dict(overrides or {}), f"method ({name})", cls)


def parse_method_section(section: Mapping[str, Any]) -> tuple[str, Any]:
    """``{name: coop, n_ctx: 4, ...}`` -> ("coop", CoOpConfig(n_ctx=4, ...)); errors are
    RecipeErrors naming the key."""
    if not isinstance(section, Mapping) or "name" not in section:
        raise RecipeError("the recipe's method section needs a name, e.g. method: {name: coop}")
    fields = dict(section)
    name = fields.pop("name")
    try:
        get_method(name)
    except KeyError as err:
        raise RecipeError(f"method.name: {err.args[0]}") from None
    return name, method_config(name, fields)


def config_dict(config) -> dict:
    """A Config as plain data (what recipes, checkpoints and adapters store)."""
    return dataclasses.asdict(config)


def check_task(name: str, task: str, data=None) -> None:
    """The method can learn / predict the data's task kind and has the data fields it needs
    (``Method.requires_data``, checked when ``data`` is given), or one message saying what."""
    from adapt.tasks import get_task

    kind = get_task(task)  # an unknown task kind is named first
    cls = get_method(name)
    if task not in cls.tasks:
        able = [m for m in list_methods() if task in get_method(m).tasks]
        raise ValueError(f"method {name!r} does {', '.join(cls.tasks)} but this data is {task} "
                         f"({kind.target}); methods for {task}: {', '.join(able) or 'none yet'}")
    for field, what in (cls.requires_data.items() if data is not None else ()):
        value = data
        for part in field.split("."):  # a nested field: class_text.descriptions
            value = getattr(value, part, None)
        if value in (None, ""):
            raise ValueError(f"method {name!r} needs data.{field}: {what}")
    captions = getattr(getattr(data, "captions", None), "file", None)
    if captions and cls.trains_on != "captions":
        takers = [m for m in list_methods() if get_method(m).trains_on == "captions"]
        raise ValueError(f"data.captions.file={captions}: method {name!r} trains on images and would ignore the "
                         f"captions; drop data.captions, or use a method trained on text: {', '.join(takers)}")


def build_method(name: str, config, backbone, classnames: Sequence[str], templates: Sequence[str],
                 task="single_label", class_text=None, class_tasks=None):
    """``config``: the method's Config, or a mapping of its fields (None = the defaults);
    ``task``: the data's task kind (``adapt/tasks/``), which the method must declare: its name,
    or the task object built with the data's options (a class tree); ``class_text``: the run's
    checked ``ClassText`` (``data.class_text``), for methods that take it; ``class_tasks``: the task
    of every class (multi_task)."""
    from adapt.tasks import Task, get_task

    kind = task if isinstance(task, Task) else get_task(task)
    check_task(name, kind.name)
    check_class_text(name, class_text)
    method = get_method(name)(method_config(name, config), backbone, classnames, templates)
    method.task = kind
    if class_text is not None:
        method.use_class_text(class_text)
    if class_tasks is not None:
        method.set_classnames(method.classnames, class_tasks)
    return method


def check_class_text(name: str, class_text) -> None:
    """A method given class text reads it (``Method.takes_class_text``), or one message."""
    if class_text is not None and not get_method(name).takes_class_text:
        able = [m for m in list_methods() if get_method(m).takes_class_text]
        raise ValueError(f"method {name!r} does not build its classifier from hand-written class text, so "
                         f"data.class_text would be ignored; drop it, or use a method that reads it: "
                         f"{', '.join(able)}")
