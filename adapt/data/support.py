"""Support sets: labelled images of the run's classes that do not come from the target dataset's
training split (SuS-X's "SuS"), declared as ``data.support``.

Sources:

* ``folder`` -- a folder the user gives, one subfolder per class (``<folder>/<class>/*.png``):
  images generated with Stable Diffusion (SuS-SD) or retrieved from LAION (SuS-LC) elsewhere.
  Subfolders are matched to the dataset's classes by normalised name (lower case, ``_`` as a
  space), as class text is; a folder naming other classes, or missing some, is one message.
* ``world`` -- the offline world's renderer drawn from each class's attributes, in another
  domain than the target's (``shift``): the stand-in for SuS-SD (world tasks only).
* ``retrieval`` -- text-to-image retrieval from a large captioned world pool: the top images of
  each class by CLIP similarity to its "photo" prompt or to its description sentences, the
  stand-in for SuS-LC (world tasks only; ``adapt/data/world/support.py``).
* ``train`` -- the K-shot training images themselves (few-shot TIP-X).

``adapt/data/support_sources.py`` makes them. Everything is checked when the data module is set
up, before any model loads: a missing folder, an unknown source, a class without images, a
non-world dataset for a world source, prompts from descriptions without a descriptions file --
each one message naming the field and the fix.
Generated images are written once into adapt's world cache (never into a user's folder); their
features go through the feature cache like every other frozen encoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from adapt.data.items import Item

SOURCES = ("folder", "world", "retrieval", "train")
PROMPTS = ("photo", "descriptions")


@dataclass
class SupportConfig:
    # where the support images come from: folder | world | retrieval | train; null = none declared
    # (a method asking for one then gets the training images)
    source: Optional[str] = None
    # source=folder: <folder>/<class>/<image>, relative to the working directory
    folder: Optional[str] = None
    # images per class: SuS-X's default 100 (a folder with more gives a seeded draw of them)
    per_class: int = 100
    # source=world: the domain the images are rendered in (adapt/data/world/domains.py), other
    # than the target's as a generator's images are; "none" = the target task's own domain
    shift: str = "clean"
    # source=retrieval: query each class by its "photo" prompt (the dataset's first template)
    # or by its description sentences (data.class_text.descriptions): SuS-LC's photo / cupl modes
    prompt: str = "photo"
    # source=retrieval: captioned scenes in the pool searched, and with prompt=descriptions the
    # sentences queried per class (the original's 10)
    pool: int = 10000
    queries: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"data.support.source={self.source!r} is not one of {', '.join(SOURCES)} (or null)")
        if self.per_class < 1 or self.pool < 1 or self.queries < 1:
            raise ValueError("data.support.per_class, .pool and .queries must be >= 1")
        if self.prompt not in PROMPTS:
            raise ValueError(f"data.support.prompt={self.prompt!r} is not one of {', '.join(PROMPTS)}")


@dataclass
class SupportSet:
    """Labelled support images: ``items`` under ``root``, labels indexing ``classnames``;
    ``augmented``: training images, which the few-shot protocol encodes under augmentation;
    ``report``: what to say about it in results (counts, retrieval precision)."""

    source: str
    root: Path
    items: list[Item]
    classnames: list[str]
    augmented: bool = False
    report: dict = field(default_factory=dict)

    @property
    def split(self) -> str:
        """The feature cache's split name: the training split's own (its entries are shared with
        Tip-Adapter's keys), else the source's."""
        return "train" if self.source == "train" else f"support:{self.source}"


def counts_report(items: Sequence[Item], n_classes: int) -> dict:
    per = [0] * n_classes
    for it in items:
        per[it.label] += 1
    return {"support_images": len(items), "support_min_per_class": min(per) if per else 0}

