"""Downstream tasks of the world: which attribute(s) are the label, in which domain, how many
images per class and split, and the prompt template. Generation is deterministic from a seed."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image

from adapt.data.world import render as _render_mod
from adapt.data.world import scenes as _scenes_mod
from adapt.data.world import shapes as _shapes_mod
from adapt.data.world import vocab
from adapt.data.world.domains import get_domain
from adapt.data.world.multi import MULTI_TASKS, MultiObjectTask
from adapt.data.world.render import render
from adapt.data.world.scenes import Scene, sample_scene

SPLITS = ("train", "val", "test")
_VALUES = {"shape": vocab.SHAPES, "colour": vocab.COLOUR_NAMES, "fill": vocab.FILLS,
           "size": vocab.SIZE_NAMES, "bg": vocab.BACKGROUND_NAMES}


@dataclass(frozen=True)
class WorldTask:
    name: str  # registry key
    attributes: tuple[str, ...]  # the label is this tuple of scene attributes
    domain: str
    template: str = "a photo of a {} shape."
    per_class: tuple[int, int, int] = (200, 50, 100)  # train, val, test images per class
    # bump when drawing code changes; changes to the task, its domain, the vocabulary or the
    # rendering constants are caught by ``fingerprint`` anyway
    version: int = 2
    image_size: int = 32

    @property
    def class_values(self) -> list[tuple[str, ...]]:
        """Attribute tuples in label order (the product of the attributes' vocabularies)."""
        return list(itertools.product(*(_VALUES[a] for a in self.attributes)))

    @property
    def classnames(self) -> list[str]:
        return [" ".join(v) for v in self.class_values]

    def fingerprint(self) -> str:
        """Short hash of everything declarative that decides this task's pixels and splits."""
        spec = {
            "task": dataclasses.asdict(self), "domain": dataclasses.asdict(get_domain(self.domain)),
            "vocab": [vocab.SHAPES, vocab.COLOURS, vocab.FILLS, vocab.SIZES, vocab.BACKGROUNDS],
            "render": [_render_mod.OFF_ALPHA, _render_mod.COLOUR_JITTER, _shapes_mod.HI,
                       _shapes_mod.OUTLINE_PX, _scenes_mod.MAX_ANGLE, _scenes_mod.ANGLE_STEP],
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.name}.json"

    loader = "zhou"  # the dataset loader that reads a build
    classnames_file = None  # the split JSON names the classes in label order

    def expected_rows(self) -> dict[str, int]:
        return {s: self.per_class[i] * len(self.classnames) for i, s in enumerate(SPLITS)}

    def count_rows(self, file: Path) -> dict[str, int]:
        data = json.loads(file.read_text())
        return {s: len(data.get(s, ())) for s in SPLITS}

    def write(self, folder: Path, seed: int) -> None:
        """PNGs under ``<split>/<class>/`` and the split JSON (written last: it marks the folder
        complete)."""
        names = self.classnames
        splits: dict[str, list] = {}
        for split in SPLITS:
            rows = []
            counts = [0] * len(names)
            for d in {n.replace(" ", "_") for n in names}:
                (folder / split / d).mkdir(parents=True, exist_ok=True)
            for image, label, _scene in self.generate(split, seed):
                rel = f"{split}/{names[label].replace(' ', '_')}/{counts[label]:05d}.png"
                counts[label] += 1
                Image.fromarray(image).save(folder / rel, compress_level=1)
                rows.append([rel, label, names[label]])
            splits[split] = rows
        meta = {"task": self.name, "version": self.version, "fingerprint": self.fingerprint(),
                "seed": seed, "domain": self.domain,
                "attributes": list(self.attributes), "classnames": names,
                "template": self.template, "per_class": dict(zip(SPLITS, self.per_class))}
        (folder / "world.json").write_text(json.dumps(meta, indent=1))
        (folder / self.split_file).write_text(json.dumps(splits))

    def seed_for(self, seed: int, split: str) -> np.random.SeedSequence:
        """Independent stream per (task name, seed, split): splits never share images."""
        return np.random.SeedSequence([zlib.crc32(self.name.encode()), self.version, seed,
                                       SPLITS.index(split)])

    def generate(self, split: str, seed: int = 0) -> Iterator[tuple[np.ndarray, int, Scene]]:
        """Yield (uint8 image, label, scene), exactly ``per_class`` images of every class,
        classes interleaved (label order repeats)."""
        n = self.per_class[SPLITS.index(split)]
        rng = np.random.default_rng(self.seed_for(seed, split))
        values = self.class_values
        for _ in range(n):
            for label, value in enumerate(values):
                scene = sample_scene(rng, self.image_size, **dict(zip(self.attributes, value)))
                yield render(scene, self.domain, rng, self.image_size), label, scene


def _task(name: str, attributes: tuple[str, ...], domain: str, **kw) -> WorldTask:
    return WorldTask(name=name, attributes=attributes, domain=domain, **kw)


TASKS: dict[str, WorldTask] = {t.name: t for t in (
    # main task: 12 colours seen under a warm colour cast (white-balance shift)
    _task("world_colour", ("colour",), "dusk"),
    # second task: the fill pattern (solid, striped, dotted, checkered, hollow) through a
    # blurry, noisy camera
    _task("world_fill", ("fill",), "noisy", per_class=(400, 100, 200)),
    # the same tasks in the other domains (domain generalisation, sanity checks)
    _task("world_colour_clean", ("colour",), "clean"),
    _task("world_colour_noisy", ("colour",), "noisy"),
    _task("world_colour_clutter", ("colour",), "clutter"),
    _task("world_colour_sketch", ("colour",), "sketch"),
    _task("world_fill_clean", ("fill",), "clean", per_class=(400, 100, 200)),
    _task("world_fill_dusk", ("fill",), "dusk", per_class=(400, 100, 200)),
    _task("world_fill_clutter", ("fill",), "clutter", per_class=(400, 100, 200)),
)}


def get_task(name: str) -> Union[WorldTask, MultiObjectTask]:
    found = TASKS.get(name) or MULTI_TASKS.get(name)
    if found is None:
        raise KeyError(f"unknown world task {name!r}; known: {sorted({**TASKS, **MULTI_TASKS})}")
    return found
