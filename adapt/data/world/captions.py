"""Captions for scenes: a random frame, a random subset of the attributes, correct articles."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

import numpy as np

from adapt.data.world import vocab
from adapt.data.world.scenes import Scene

# Probability that a caption names each attribute when its frame has an optional slot for it.
# Colour is the world's main attribute and is named most often.
MENTION = {"colour": 0.85, "fill": 0.7, "shape": 0.75, "size": 0.5, "bg": 0.6}
GENERIC_SHAPE_P = 0.25  # an optional shape word is replaced by "shape"/"object"/"figure" this often
_SLOTS = ("size", "colour", "fill", "shape", "bg")


@lru_cache(maxsize=None)
def frame_slots(frame: str) -> tuple[frozenset, frozenset]:
    """(all slots, required slots) of a frame; required slots are written in upper case."""
    names = re.findall(r"\{(\w+)\}", frame)
    return frozenset(n.lower() for n in names), frozenset(n.lower() for n in names if n.isupper())


def _article(match: re.Match) -> str:
    art = "an" if match.group(2)[0] in "aeiou" else "a"
    return f"{art} {match.group(2)}"


def tidy(text: str) -> str:
    """Collapse spaces left by empty slots and make a/an agree with the next word."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b(a|an) (\w+)", _article, text)


def caption(scene: Scene, rng: np.random.Generator, must: Iterable[str] = (),
            frame: Optional[str] = None) -> str:
    """A caption for ``scene``. Attributes in ``must`` are always named (the frame is drawn among
    those with a slot for each); at least one of colour, fill or shape word is always named."""
    must = set(must)
    if frame is None:
        frames = [f for f in vocab.FRAMES if must <= frame_slots(f)[0]]
        frame = frames[int(rng.integers(len(frames)))]
    slots, required = frame_slots(frame)
    draws = rng.random(len(_SLOTS) + 3)
    forced = set(must) | set(required)
    keep = {n: n in slots and (n in forced or draws[k] < MENTION[n]) for k, n in enumerate(_SLOTS)}
    if keep["fill"] and scene.fill == "solid" and "fill" not in forced and draws[-3] < 0.5:
        keep["fill"] = False  # a solid shape is often just "a red star"
    if keep["shape"] and "shape" not in forced and draws[-1] < GENERIC_SHAPE_P:
        keep["shape"] = False  # "a red shape"
    if not (keep["colour"] or keep["fill"] or keep["shape"]):
        keep["colour" if "colour" in slots else "shape"] = True
    words = {n: scene.attribute(n) if keep[n] else "" for n in _SLOTS}
    if words["fill"] == "hollow" and draws[-2] < 0.5:
        words["fill"] = "outlined"  # a synonym, so "hollow" is not the only word for it
    if "shape" in slots and not words["shape"]:
        words["shape"] = vocab.GENERIC_NOUNS[int(rng.integers(len(vocab.GENERIC_NOUNS)))]
    fmt = dict(words)
    fmt.update({n.upper(): w for n, w in words.items()})
    return tidy(frame.format(**fmt))
