"""Multi-object world tasks: 1 to ``max_objects`` objects per image, each of a different value of
the label attribute (its colour, by default), placed with seeded positions and drawn in order
(later objects occlude earlier ones); the label is the multi-hot set of values shown.

A build is a folder of PNGs plus a ``multilabel_csv`` file (``path,labels,split``), read by the
same loader as a user's own multi-label data.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from adapt.data.world import render as _render_mod
from adapt.data.world import scenes as _scenes_mod
from adapt.data.world import shapes as _shapes_mod
from adapt.data.world import vocab
from adapt.data.world.domains import get_domain
from adapt.data.world.render import render_objects
from adapt.data.world.scenes import Scene, sample_scene

SPLITS = ("train", "val", "test")
_VALUES = {"shape": vocab.SHAPES, "colour": vocab.COLOUR_NAMES, "fill": vocab.FILLS}
MAX_OVERLAP = 0.25  # an object's box may share at most this fraction of its area with an earlier one
PLACEMENT_TRIES = 20


def _overlap(a: Scene, b: Scene) -> float:
    w = max(0, min(a.x + a.side, b.x + b.side) - max(a.x, b.x))
    h = max(0, min(a.y + a.side, b.y + b.side) - max(a.y, b.y))
    return w * h / float(min(a.side, b.side) ** 2)


@dataclass(frozen=True)
class MultiObjectTask:
    name: str
    attribute: str  # the label: the set of this attribute's values in the image
    domain: str
    max_objects: int = 3
    images: tuple[int, int, int] = (1200, 300, 600)  # train, val, test images
    template: str = "a photo of a {} shape."
    size: str = "small"  # every object's size class (three large objects would hide each other)
    version: int = 1
    image_size: int = 32

    @property
    def classnames(self) -> list[str]:
        return list(_VALUES[self.attribute])

    @property
    def split_file(self) -> str:
        return f"{self.name}.csv"

    loader = "multilabel_csv"  # the dataset loader that reads a build
    classnames_file = "classnames.txt"  # the class order (the vocabulary's, not alphabetical)

    header = ("path", "labels", "split")  # the loader's CSV columns

    def target_cell(self, folder: Path, rel: str, labels: list[int], objects: np.ndarray, scenes) -> str:
        """The CSV's target column of one image: the class names shown, joined by ';'."""
        return ";".join(self.classnames[c] for c in labels)

    def fingerprint(self) -> str:
        spec = {"task": dataclasses.asdict(self), "domain": dataclasses.asdict(get_domain(self.domain)),
                "vocab": [vocab.SHAPES, vocab.COLOURS, vocab.FILLS, vocab.SIZES, vocab.BACKGROUNDS],
                "render": [_render_mod.OFF_ALPHA, _render_mod.COLOUR_JITTER, _shapes_mod.HI,
                           _shapes_mod.OUTLINE_PX, _scenes_mod.MAX_ANGLE, _scenes_mod.ANGLE_STEP,
                           MAX_OVERLAP, PLACEMENT_TRIES]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def seed_for(self, seed: int, split: str) -> np.random.SeedSequence:
        return np.random.SeedSequence([zlib.crc32(self.name.encode()), self.version, seed, SPLITS.index(split)])

    def scenes(self, rng: np.random.Generator) -> list[Scene]:
        """1..max_objects objects with distinct label values, placed so that no box hides more
        than ``MAX_OVERLAP`` of another (the last try is kept if none does)."""
        values = _VALUES[self.attribute]
        count = int(rng.integers(1, self.max_objects + 1))
        picks = rng.choice(len(values), size=count, replace=False)
        out: list[Scene] = []
        for v in picks:
            for _ in range(PLACEMENT_TRIES):
                scene = sample_scene(rng, self.image_size, size=self.size, **{self.attribute: values[int(v)]})
                if all(_overlap(scene, o) <= MAX_OVERLAP for o in out):
                    break
            out.append(scene)
        return out

    def generate(self, split: str, seed: int = 0) -> Iterator[tuple[np.ndarray, list[int], np.ndarray, list[Scene]]]:
        """Yield (uint8 image, sorted label ids, label map of object indices, scenes)."""
        rng = np.random.default_rng(self.seed_for(seed, split))
        values = _VALUES[self.attribute]
        for _ in range(self.images[SPLITS.index(split)]):
            scenes = self.scenes(rng)
            image, objects = render_objects(scenes, self.domain, rng, self.image_size)
            yield image, sorted(values.index(s.attribute(self.attribute)) for s in scenes), objects, scenes

    def expected_rows(self) -> dict[str, int]:
        return dict(zip(SPLITS, self.images))

    def count_rows(self, file: Path) -> dict[str, int]:
        counts = dict.fromkeys(SPLITS, 0)
        with open(file, newline="") as f:
            for row in csv.DictReader(f):
                counts[row["split"]] = counts.get(row["split"], 0) + 1
        return counts

    def write(self, folder: Path, seed: int) -> None:
        names = self.classnames
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header)
        for split in SPLITS:
            (folder / split).mkdir(parents=True, exist_ok=True)
            for i, (image, labels, objects, scenes) in enumerate(self.generate(split, seed)):
                rel = f"{split}/{i:05d}.png"
                Image.fromarray(image).save(folder / rel, compress_level=1)
                writer.writerow([rel, self.target_cell(folder, rel, labels, objects, scenes), split])
        meta = {"task": self.name, "version": self.version, "fingerprint": self.fingerprint(), "seed": seed,
                "domain": self.domain, "attribute": self.attribute, "classnames": names,
                "template": self.template, "images": dict(zip(SPLITS, self.images)),
                "max_objects": self.max_objects}
        (folder / "world.json").write_text(json.dumps(meta, indent=1))
        (folder / self.classnames_file).write_text("".join(f"{n}\n" for n in names))
        (folder / self.split_file).write_text(out.getvalue())  # last: it marks the folder complete


class SegmentationWorldTask(MultiObjectTask):
    """The same scenes with a label map per image (``masks/<split>/<i>.png``): each pixel the
    class of the object seen there (the object's opacity at least one half, later objects
    over earlier ones), the background and the clutter 255 (ignored), as the "without background"
    protocol of MaskCLIP's VOC-20 and Context-59 figures. A ``segmentation_csv`` build."""

    loader = "segmentation_csv"
    header = ("path", "mask", "split")

    def target_cell(self, folder, rel, labels, objects, scenes) -> str:
        values = _VALUES[self.attribute]
        lut = np.full(256, 255, np.uint8)  # object index (int8, -1 = background) -> class id
        for i, scene in enumerate(scenes):
            lut[i] = values.index(scene.attribute(self.attribute))
        mask_rel = f"masks/{rel}"
        (folder / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lut[objects.astype(np.uint8)], mode="L").save(folder / mask_rel, compress_level=1)
        return mask_rel


MULTI_TASKS: dict[str, MultiObjectTask] = {t.name: t for t in (
    # the colours of 1-3 objects per image, seen under world_colour's warm cast
    MultiObjectTask("world_multi_colour", "colour", "dusk"),
    MultiObjectTask("world_multi_colour_clean", "colour", "clean"),
    # the same kind of scenes with a label map per image: which colour each pixel shows
    SegmentationWorldTask("world_seg_colour", "colour", "dusk"),
)}
