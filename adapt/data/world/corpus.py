"""A caption-only stream for the world's multi-object tasks: captions of scenes that are never
rendered (the world's stand-in for COCO's captions in TaI-DPT's "texts as images").

Each caption describes a scene of 1 to ``max_objects`` objects drawn as the task draws them
(distinct values of its label attribute), each object named by a phrase of the world's caption
words ("a red striped star", "a blue shape"), joined by one of several frames ("a picture of a
red star and a blue ring on a grey background", "there is a green square next to a cyan
heart"). As in a real caption corpus, a caption need not name every object's label: each
object's label word is left out with probability ``omit`` (its phrase then names its fill or
shape only), so the labels a caption is given by matching its words (adapt/data/captions.py)
are the ones it states. Seeded; every word is in the tiny CLIP's caption vocabulary.

    python -m adapt.data.world.corpus world_multi_colour captions.txt [--n 20000] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from adapt.data.world import vocab
from adapt.data.world.captions import tidy
from adapt.data.world.multi import MULTI_TASKS, MultiObjectTask
from adapt.data.world.scenes import Scene
from adapt.io import atomic_write_text

OMIT = 0.1  # an object's label word is left out of its phrase this often
FILL_P = 0.4  # an object's fill is named this often (when it is not solid)
BG_P = 0.4  # the frames with a background name it this often
# frames for 2+ objects; {objs} is "A and B" / "A, B and C"
FRAMES = ("{objs}", "a picture of {objs}", "a photo of {objs}", "there is {objs}", "{objs} on a {bg} background",
          "an image of {objs} on {bg}", "a drawing with {objs}")
PAIR_FRAMES = ("{a} next to {b}", "{a} beside {b}", "{a} and {b} on a {bg} background", "{a} above {b}")


def phrase(scene: Scene, label: str, rng: np.random.Generator) -> str:
    """One object: "a [colour] [fill] shape-word"; the label attribute named unless omitted."""
    words = {"colour": scene.colour, "fill": scene.fill, "shape": scene.shape}
    show_fill = scene.fill != "solid" and rng.random() < FILL_P
    if words["fill"] == "hollow" and rng.random() < 0.5:
        words["fill"] = "outlined"
    parts = []
    if label != "colour" or rng.random() >= OMIT:
        parts.append(words["colour"])
    if show_fill or label == "fill":
        if label != "fill" or rng.random() >= OMIT:
            parts.append(words["fill"])
    noun = words["shape"]
    if label != "shape" and rng.random() < 0.25:
        noun = vocab.GENERIC_NOUNS[int(rng.integers(len(vocab.GENERIC_NOUNS)))]
    return tidy("a " + " ".join(parts + [noun]))


def describe_scene(scenes: Sequence[Scene], label: str, rng: np.random.Generator) -> str:
    objs = [phrase(s, label, rng) for s in scenes]
    bg = scenes[0].bg if rng.random() < BG_P else vocab.BACKGROUND_NAMES[int(rng.integers(len(vocab.BACKGROUND_NAMES)))]
    if len(objs) == 2 and rng.random() < 0.4:
        frame = PAIR_FRAMES[int(rng.integers(len(PAIR_FRAMES)))]
        return tidy(frame.format(a=objs[0], b=objs[1], bg=bg))
    joined = objs[0] if len(objs) == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
    frame = FRAMES[int(rng.integers(len(FRAMES)))]
    return tidy(frame.format(objs=joined, bg=bg))


def corpus(task: MultiObjectTask, n: int, seed: int = 0) -> list[str]:
    """``n`` captions of unrendered scenes of ``task`` (its own scene sampler, a seed stream of
    its own: no caption describes an image of the task's splits)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA97]))
    return [describe_scene(task.scenes(rng), task.attribute, rng) for _ in range(n)]


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m adapt.data.world.corpus", description=__doc__.split("\n")[0])
    p.add_argument("task", help=f"a multi-object world task: {', '.join(sorted(MULTI_TASKS))}")
    p.add_argument("out", type=Path, help="the text file to write (one caption per line)")
    p.add_argument("--n", type=int, default=20000, help="captions to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = p.parse_args(argv)
    task = MULTI_TASKS.get(args.task)
    if task is None:
        p.error(f"{args.task!r} is not a multi-object world task; known: {', '.join(sorted(MULTI_TASKS))}")
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it, or choose another file")
    return atomic_write_text(args.out, "".join(c + "\n" for c in corpus(task, args.n, args.seed)))


if __name__ == "__main__":
    main()
