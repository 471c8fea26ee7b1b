"""Base-to-novel class subsets, by the CoCoOp rule.

Label ids sorted; base = the first ceil(n/2), novel = the rest; each subset relabelled 0..k-1 in
sorted order, identically in train, val and test. Few-shot sampling runs over all classes before
this (so a seed picks the same base images whether or not the setting is base2novel).
"""
from __future__ import annotations

import math
from typing import Sequence

from adapt.data.items import Item

SUBSETS = ("all", "base", "novel")


def subset_labels(num_classes: int, which: str) -> list[int]:
    """The original label ids of ``which`` (all / base / novel), sorted."""
    if which not in SUBSETS:
        raise ValueError(f"unknown class subset {which!r}; expected one of {', '.join(SUBSETS)}")
    cut = math.ceil(num_classes / 2)
    return {"all": list(range(num_classes)), "base": list(range(cut)),
            "novel": list(range(cut, num_classes))}[which]


def subsample_classes(items: Sequence[Item], classnames: Sequence[str],
                      which: str) -> tuple[list[Item], list[str]]:
    """Keep the items of one class subset, relabelled to 0..k-1; returns (items, classnames)."""
    keep = subset_labels(len(classnames), which)
    relabel = {old: new for new, old in enumerate(keep)}
    out = [Item(it.path, relabel[it.label]) for it in items if it.label in relabel]
    return out, [classnames[i] for i in keep]
