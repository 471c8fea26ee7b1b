"""Support sets made by the world: the offline stand-ins for SuS-X's Stable-Diffusion images
(SuS-SD) and its LAION retrieval (SuS-LC). ``adapt/data/support.py`` declares and checks them.

* Rendered (``data.support.source=world``): ``per_class`` scenes of every class of a one-object
  world task, its label attributes pinned and the rest drawn at random, rendered in the domain
  ``shift`` (another camera than the target's, as a generator's pictures are not the test set's
  photographs). A seeded stream of its own: never the task's train / val / test images.
* Retrieval (``source=retrieval``): a pool of ``pool`` captioned scenes of any attributes, each in
  a random domain (a web corpus mixes cameras), searched by the frozen CLIP, text to image: each
  class keeps its ``per_class`` most similar images to its "photo" prompt, or, with
  ``prompt=descriptions``, the images its ``queries`` description sentences rank highest, taken
  rank by rank across the sentences (SuS-LC's cupl mode pools 10 sentences' results). An image
  may be kept by two classes, as a web image found by two queries is. The pool's scenes are
  known, so the report gives the share of kept images whose class is right.

Both are written once into adapt's world cache (``build.build_folder``: a temporary folder
renamed into place), as ``support.json`` / ``pool.json`` listing the images.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adapt.data.items import Item
from adapt.data.support import SupportConfig, SupportSet, counts_report
from adapt.data.world.build import build_folder, cache_root
from adapt.data.world.captions import caption
from adapt.data.world.domains import DOMAINS
from adapt.data.world.render import render
from adapt.data.world.scenes import sample_scene
from adapt.data.world.tasks import TASKS, WorldTask

VERSION = 1  # bump when the drawing of support sets or pools changes
TEXT_CHUNK = 1024  # prompts per text-tower call


def world_task(source: str, dataset_name: str) -> WorldTask:
    task = TASKS.get(dataset_name)
    if task is None:
        raise ValueError(f"data.support.source={source} draws on the offline world, which knows the classes of "
                         f"its own one-object tasks ({', '.join(sorted(TASKS))}), and data.dataset={dataset_name} "
                         "is not one; give your own generated or retrieved images as data.support.source=folder "
                         "with data.support.folder=<folder>/<class>/*.png")
    return task


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True).encode()).hexdigest()[:12]


def _listed(folder: Path, name: str, fingerprint: str, rows: int) -> bool:
    try:
        meta = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and len(meta.get("rows", ())) == rows


def _save(folder: Path, rel: str, image: np.ndarray) -> None:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / rel, compress_level=1)


# ------------------------------------------------------------------------------ rendered (SuS-SD)
def rendered_support(cfg: SupportConfig, dataset_name: str, classnames: Sequence[str]) -> SupportSet:
    task = world_task("world", dataset_name)
    domain = task.domain if cfg.shift == "none" else cfg.shift
    if domain not in DOMAINS:
        raise ValueError(f"data.support.shift={cfg.shift!r} is not a world domain ({', '.join(sorted(DOMAINS))}) "
                         f"or none (the target's own, {task.domain})")
    if cfg.prompt != "photo":
        raise ValueError("data.support.prompt=descriptions chooses retrieval queries; the world renders each "
                         "class from its attributes: use data.support.prompt=photo with source=world")
    fp = _fingerprint(task.fingerprint(), domain, cfg.per_class, cfg.seed)
    folder = cache_root() / f"support-{task.name}-{domain}-n{cfg.per_class}-seed{cfg.seed}-{fp}"
    names = task.classnames

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(b"support"), zlib.crc32(task.name.encode()),
                                                            cfg.seed]))
        rows = []
        for i in range(cfg.per_class):
            for label, value in enumerate(task.class_values):
                scene = sample_scene(rng, task.image_size, **dict(zip(task.attributes, value)))
                rel = f"{names[label].replace(' ', '_')}/{i:05d}.png"
                _save(tmp, rel, render(scene, domain, rng, task.image_size))
                rows.append([rel, label])
        (tmp / "support.json").write_text(json.dumps({"fingerprint": fp, "domain": domain, "rows": rows}))

    rows = len(names) * cfg.per_class
    build_folder(folder, write, lambda f: _listed(f, "support.json", fp, rows), {"support": task.name, "seed": cfg.seed})
    listed = json.loads((folder / "support.json").read_text())["rows"]
    items = [Item(rel, int(label)) for rel, label in listed]
    return SupportSet("world", folder, items, list(names),
                      report={**counts_report(items, len(names)), "support_domain": domain})


# ------------------------------------------------------------------------------ retrieval (SuS-LC)
@dataclass
class Pool:
    """A rendered, captioned pool awaiting the model that ranks it (``retrieve``)."""

    cfg: SupportConfig
    task: WorldTask
    folder: Path
    rows: list  # [relative path, caption, {attribute: value}]
    classnames: list[str]


def retrieval_pool(cfg: SupportConfig, dataset_name: str, classnames: Sequence[str]) -> Pool:
    task = world_task("retrieval", dataset_name)
    if cfg.pool < cfg.per_class:
        raise ValueError(f"data.support.pool={cfg.pool} cannot give {cfg.per_class} images per class: make the "
                         "pool larger or data.support.per_class smaller")
    fp = _fingerprint(task.image_size, sorted(DOMAINS), cfg.pool, cfg.seed)
    folder = cache_root() / f"pool-n{cfg.pool}-seed{cfg.seed}-{fp}"
    domains = sorted(DOMAINS)

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(b"pool"), cfg.seed]))
        rows = []
        for i in range(cfg.pool):
            scene = sample_scene(rng, task.image_size)
            domain = domains[int(rng.integers(len(domains)))]
            rel = f"{i // 1000:03d}/{i:06d}.png"
            _save(tmp, rel, render(scene, domain, rng, task.image_size))
            attributes = {a: scene.attribute(a) for a in ("shape", "colour", "fill", "size", "bg")}
            rows.append([rel, caption(scene, rng), {**attributes, "domain": domain}])
        (tmp / "pool.json").write_text(json.dumps({"fingerprint": fp, "rows": rows}))

    build_folder(folder, write, lambda f: _listed(f, "pool.json", fp, cfg.pool), {"pool": cfg.pool, "seed": cfg.seed})
    rows = json.loads((folder / "pool.json").read_text())["rows"]
    return Pool(cfg, task, folder, rows, list(classnames))


def retrieve(pool: Pool, backbone, encode: Callable[[Sequence[Item], Path], torch.Tensor], template: str,
             sentences: Optional[dict] = None) -> SupportSet:
    """Each class's ``per_class`` pool images most similar to its queries. ``encode(items, root)``
    gives the pool's image features [n, d] (through the feature cache); ``template`` makes the
    photo prompt; ``sentences`` maps each class to its description sentences."""
    cfg = pool.cfg
    images = F.normalize(encode([Item(r[0], 0) for r in pool.rows], pool.folder).float(), dim=-1)
    rng = np.random.default_rng(cfg.seed)
    queries, owner = [], []
    for label, name in enumerate(pool.classnames):
        if cfg.prompt == "photo":
            texts = [template.format(name)]
        else:  # a seeded sample of the class's sentences, as the original's 10 random ones
            found = list(sentences[name])
            texts = [found[i] for i in sorted(rng.choice(len(found), min(cfg.queries, len(found)), replace=False))]
        queries += texts
        owner += [label] * len(texts)
    with torch.no_grad():
        text = torch.cat([backbone.encode_text(backbone.tokenize(queries[i:i + TEXT_CHUNK]))
                          for i in range(0, len(queries), TEXT_CHUNK)]).float()
    order = (F.normalize(text, dim=-1) @ images.to(text.device).t()).argsort(dim=-1, descending=True).cpu().numpy()
    owner = np.asarray(owner)
    items, right = [], 0
    values = {name: value for name, value in zip(pool.task.classnames, pool.task.class_values)}
    for label, name in enumerate(pool.classnames):
        ranked = order[owner == label].T.reshape(-1)  # rank by rank across the class's queries
        _, first = np.unique(ranked, return_index=True)
        for i in ranked[np.sort(first)][:cfg.per_class]:
            row = pool.rows[int(i)]
            items.append(Item(row[0], label))
            right += tuple(row[2][a] for a in pool.task.attributes) == values.get(name)
    report = {**counts_report(items, len(pool.classnames)), "support_label_precision": 100.0 * right / len(items)}
    return SupportSet("retrieval", pool.folder, items, list(pool.classnames), report=report)
