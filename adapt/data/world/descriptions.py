"""Class descriptions for the world's tasks: the offline stand-in for an LLM's (CuPL, VCD).

A language model asked "what does a(n) {class} look like?" answers with sentences that name the
class's defining attributes beside incidental ones. Here the answers are captions of scenes drawn
with the class's attributes (the others at random), in the caption grammar the world's CLIP was
trained on, so every word is in its vocabulary. Three modes:

* ``faithful`` -- each sentence names the class's own attribute values.
* ``noisy`` -- each sentence, with probability ``noise``, describes a wrong value of the class's
  attribute instead (a hallucinating model).
* ``random`` -- the class name followed by random words from the other attributes' vocabularies
  ("red, which has dotted star navy"): WaffleCLIP's control (Roth et al., ICCV 2023), which found
  random descriptors gain nearly as much as an LLM's.

``--format descriptions`` writes CuPL's {class: [sentence, ...]}; ``descriptors`` writes VCD's
{class: [phrase, ...]} (the same captions, composed with the name by the method). Seeded.

    python -m adapt.data.world.descriptions world_colour descriptions.json --mode faithful
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from adapt.data.world.captions import caption
from adapt.data.world.scenes import sample_scene
from adapt.data.world.tasks import _VALUES, TASKS
from adapt.io import atomic_write_json

MODES = ("faithful", "noisy", "random")
FORMATS = {"descriptions": 30, "descriptors": 6}  # per class: CuPL's base files have 30, VCD's 2-11
RANDOM_WORDS = 3  # WaffleCLIP's random descriptors are a few words long


def describe(task_name: str, mode: str = "faithful", per_class: int = 30, noise: float = 0.3,
             seed: int = 0) -> dict[str, list[str]]:
    """``per_class`` sentences for each class of the world task ``task_name``."""
    task = TASKS.get(task_name)
    if task is None:
        raise ValueError(f"{task_name!r} is not a one-object world task; known: {', '.join(sorted(TASKS))}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise={noise} must be in [0, 1] (the share of sentences with a wrong attribute)")
    rng = np.random.default_rng(seed)
    other_words = [w for a, values in _VALUES.items() if a not in task.attributes for w in values]
    out = {}
    for name, values in zip(task.classnames, task.class_values):
        sentences = []
        for _ in range(per_class):
            if mode == "random":
                picks = rng.choice(len(other_words), size=RANDOM_WORDS, replace=False)
                sentences.append(f"{name}, which has " + " ".join(other_words[i] for i in picks))
                continue
            shown = dict(zip(task.attributes, values))
            if mode == "noisy" and rng.random() < noise:
                shown = {a: _other(rng, _VALUES[a], v) for a, v in shown.items()}
            scene = sample_scene(rng, task.image_size, **shown)
            sentences.append(caption(scene, rng, must=task.attributes))
        out[name] = sentences
    return out


def _other(rng: np.random.Generator, values: Sequence[str], value: str) -> str:
    rest = [v for v in values if v != value]
    return rest[int(rng.integers(len(rest)))]


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m adapt.data.world.descriptions", description=__doc__.split("\n")[0])
    p.add_argument("task", help=f"a one-object world task: {', '.join(sorted(TASKS))}")
    p.add_argument("out", type=Path, help="the JSON file to write")
    p.add_argument("--mode", choices=MODES, default="faithful")
    p.add_argument("--format", choices=sorted(FORMATS), default="descriptions")
    p.add_argument("--per-class", type=int, default=None, help="sentences per class (default: 30 descriptions, 6 descriptors)")
    p.add_argument("--noise", type=float, default=0.3, help="noisy mode: the share of sentences with a wrong attribute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it, or choose another file")
    per_class = args.per_class or FORMATS[args.format]
    try:
        text = describe(args.task, args.mode, per_class, args.noise, args.seed)
    except ValueError as err:
        p.error(str(err))
    return atomic_write_json(args.out, text)


if __name__ == "__main__":
    main()
