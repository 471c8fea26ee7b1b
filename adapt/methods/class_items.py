"""A data module's items relabelled to a method's own class list, matched by cleaned class name:
what a method builds from the splits when its classes are another list than the data's
(Tip-Adapter's cache, the linear probe, a support set). Not a method, so no departures: none."""
from __future__ import annotations

from typing import Sequence

from adapt.data.items import Item, clean_classname


def items_of_classes(items: Sequence[Item], names: Sequence[str], classnames: Sequence[str]) -> list[Item]:
    """The items (labelled by index into ``names``) whose class is one of ``classnames``,
    relabelled to that order, matched by cleaned name: what a method builds from the data
    module's splits when its own class list is another one (Tip-Adapter's cache, the probe)."""
    index = {c: i for i, c in enumerate(classnames)}
    relabel = {old: index[clean_classname(n)] for old, n in enumerate(names) if clean_classname(n) in index}
    return [Item(it.path, relabel[it.label]) for it in items if it.label in relabel]


def items_of_every_class(items: Sequence[Item], names: Sequence[str], classnames: Sequence[str],
                         need: str) -> list[Item]:
    """``items_of_classes``, refusing a class left without any item; ``need`` says what the
    method needs them for (the message's first half)."""
    out = items_of_classes(items, names, classnames)
    missing = sorted(set(range(len(classnames))) - {it.label for it in out})
    if missing:
        shown = ", ".join(classnames[i] for i in missing[:5])
        raise ValueError(f"{need}; the data has none of {len(missing)} class(es): {shown}")
    return out
