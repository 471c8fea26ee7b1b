"""Typed config sections: OmegaConf merges whose errors name the key and the fix.

Shared by the recipe (``adapt.config``) and the method registry, which parses a method's own
section; it imports neither, so the two never import each other.
"""
from __future__ import annotations

import difflib
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


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


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{key}={value!r} is not one of {', '.join(choices)}.{hint}")
