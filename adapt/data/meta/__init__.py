"""Per-dataset data files: prompt templates, class-name rules and class lists (``<name>.json``).

Keys: ``name`` (the dataset's usual spelling), ``templates`` (the protocol's single hand-written
template first), optional ``ensemble`` (the zero-shot template ensemble), ``ignore`` / ``rename``
(class-folder rules applied when a split is generated), ``classnames`` (ImageNet: WordNet id ->
readable CLIP name, in label order; MNIST, CIFAR: CLIP's names, a list in label order), ``wnids``
(the 200 classes of ImageNet-A / -R) and ``classes_of`` (the dataset whose class list a test-only
variant uses).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

META_DIR = Path(__file__).parent


@functools.lru_cache(maxsize=None)
def dataset_meta(name: str) -> dict:
    path = META_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no data file for dataset {name!r} in {META_DIR}")
    return json.loads(path.read_text())


def templates_by_name(name: str) -> list[str]:
    """The templates of the dataset whose usual spelling (``OxfordPets``, the part after
    ``split_zhou_`` in its split file) is ``name``; [] when no data file has it."""
    for path in sorted(META_DIR.glob("*.json")):
        meta = dataset_meta(path.stem)
        if meta.get("name") == name:
            return list(meta["templates"])
    return []
