"""K-shot sampling, exactly as the CoOp protocol's code draws it, and the manifests that pin it down.

The original sampler (Dassl's ``generate_fewshot_dataset``, called by every CoOp dataset) groups
the training items by label in the order each label *first appears* in the split's train list,
then calls ``random.sample(items_of_label, K)`` label after label on Python's global ``random``,
seeded with the run's seed just before the dataset is built. The validation subset
(``min(K, 4)`` per class) is drawn next, from the same stream, continuing where the training
draw stopped. Reproducing all three details (first-appearance order, ``random.sample``, one
stream for train then val) gives the published few-shot images for the same seed and K.

Here the stream is a private ``random.Random(seed)``: its draws equal the global ``random``
after ``random.seed(seed)``, and whatever else ran before (model init, other sampling) cannot
change which images a run trains on. A manifest stores the result as relative paths plus the
class list, so a run can be repeated on exactly the same images on another machine.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from adapt.data.items import DatasetSplits, Item

MANIFEST_FORMAT = 1
VAL_SHOTS = 4  # the protocol's validation subset: min(K, 4) per class
SAMPLER = "coop"  # recorded in manifests: which rule drew the sample


def _class_name(classnames: Optional[Sequence[str]], label: int) -> str:
    return repr(classnames[label]) if classnames and 0 <= label < len(classnames) else f"with label {label}"


def sample_few_shot(items: Sequence[Item], k: int, seed: int, allow_fewer: bool = False,
                    classnames: Optional[Sequence[str]] = None,
                    rng: Optional[random.Random] = None) -> list[Item]:
    """K items per label, drawn without replacement by the protocol's rule; ``k <= 0`` keeps all.

    Labels are visited in the order they first appear in ``items``; each draws
    ``rng.sample(its_items, k)`` (a class with fewer than K keeps all of them and draws nothing).
    The result is in draw order, as the original code returns it. ``rng`` continues a stream
    (the validation draw after the training draw); without it a fresh ``random.Random(seed)``.
    ``classnames`` (optional) names classes in errors and makes a class with no item at all count
    as one with too few.
    """
    if k <= 0:
        return list(items)
    rng = rng if rng is not None else random.Random(seed)
    by_label: dict[int, list[Item]] = {}  # insertion order = first appearance, as Dassl's tracker
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    chosen: list[Item] = []
    short = [f"{_class_name(classnames, c)} has 0" for c in range(len(classnames or ())) if c not in by_label]
    for label, group in by_label.items():
        if len(group) >= k:
            chosen += rng.sample(group, k)
        else:
            short.append(f"{_class_name(classnames, label)} has {len(group)}")
            chosen += group
    if short and not allow_fewer:
        more = f" (and {len(short) - 3} more classes)" if len(short) > 3 else ""
        raise ValueError(f"{k}-shot sampling needs {k} images per class, but class "
                         f"{'; class '.join(short[:3])}{more}. Lower data.shots, or set "
                         f"data.allow_fewer_shots=true to take all of them as the CoOp protocol does")
    return chosen


def sample_validation(items: Sequence[Item], k: int, seed: int,
                      classnames: Optional[Sequence[str]] = None,
                      rng: Optional[random.Random] = None) -> list[Item]:
    """The protocol's validation subset: min(K, 4) per class (fewer if a class has fewer);
    all of it when K <= 0 (the supervised setting). Pass the training draw's ``rng`` to continue
    its stream, as the original code does."""
    return sample_few_shot(items, min(k, VAL_SHOTS) if k > 0 else 0, seed, allow_fewer=True,
                           classnames=classnames, rng=rng)


# ------------------------------------------------------------------------------------ manifests
@dataclass
class Manifest:
    dataset: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    shots: int
    seed: int
    setting: str
    extra: dict = field(default_factory=dict)


def _items_json(items: Sequence[Item]) -> str:
    # one item per line: diffable, and a 16-shot ImageNet manifest stays easy to skim
    if not items:
        return "[]"
    return "[\n" + ",\n".join("  " + json.dumps([it.path, it.label]) for it in items) + "\n ]"


def write_manifest(path: Union[str, Path], dataset_name: str, classnames: Sequence[str],
                   train: Sequence[Item], val: Sequence[Item], shots: int, seed: int, setting: str,
                   extra: Optional[dict] = None) -> Path:
    """Write the few-shot sample as JSON (relative paths, labels, class list). Written to a
    temporary file and renamed, so several processes (DDP ranks) never leave a torn file."""
    path = Path(path)
    head = {"format": MANIFEST_FORMAT, "dataset": dataset_name, "setting": setting, "shots": shots,
            "seed": seed, "sampler": SAMPLER, "classnames": list(classnames), **(extra or {})}
    fields = [(k, json.dumps(v)) for k, v in head.items()]
    fields += [("train", _items_json(train)), ("val", _items_json(val))]
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {v}" for k, v in fields) + "\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_manifest(path: Union[str, Path]) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (data.manifest)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from None
    required = ("dataset", "classnames", "train", "val", "shots", "seed", "setting")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"manifest {path} lacks {', '.join(missing)}; is it an adapt manifest.json?")
    n = len(data["classnames"])

    def label(raw):
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < n:
            return raw
        if isinstance(raw, list) and len(raw) == n and all(v in (-1, 0, 1) for v in raw):
            return tuple(raw)  # a multi-hot label, -1 = unknown
        if isinstance(raw, str) and raw:
            return raw  # a label map's path
        return None

    def items(split: str) -> list[Item]:
        out = []
        for row in data[split]:
            found = label(row[1]) if isinstance(row, list) and len(row) == 2 else None
            if found is None:
                raise ValueError(f"manifest {path}: {split} entry {row!r} is not [path, label < {n}] "
                                 f"or [path, multi-hot list of {n} entries in -1 / 0 / 1] or [path, label-map path]")
            out.append(Item(str(row[0]), found))
        return out

    extra = {k: v for k, v in data.items() if k not in required and k != "format"}
    return Manifest(dataset=data["dataset"], classnames=list(data["classnames"]), train=items("train"),
                    val=items("val"), shots=int(data["shots"]), seed=int(data["seed"]),
                    setting=str(data["setting"]), extra=extra)


def check_manifest(manifest: Manifest, dataset: DatasetSplits, shots: int, where: str = "data.manifest") -> None:
    """Refuse a manifest that does not describe this dataset: a different class list would
    silently mislabel, and an image outside the split it claims (e.g. a test image in train)
    would leak."""
    if manifest.classnames != dataset.classnames:
        a, b = manifest.classnames, dataset.classnames
        diff = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        first = (f"first difference at label {diff}: {a[diff] if diff < len(a) else '(none)'!r} "
                 f"vs {b[diff] if diff < len(b) else '(none)'!r}")
        raise ValueError(f"{where}: the manifest's class list ({len(a)} classes, dataset "
                         f"{manifest.dataset!r}) differs from the loaded dataset's ({len(b)} classes, "
                         f"{dataset.name!r} at {dataset.root}); {first}")
    if manifest.shots != shots:
        raise ValueError(f"{where} holds a {manifest.shots}-shot sample but data.shots={shots}; set "
                         f"data.shots={manifest.shots}, or drop data.manifest to sample anew")
    for split in ("train", "val"):
        known = {it.path: it.label for it in dataset.split(split)}
        stray = [it for it in getattr(manifest, split)
                 if it.path not in known or not _agrees(it.label, known[it.path])]
        if stray:
            raise ValueError(f"{where}: {len(stray)} {split} item(s) of the manifest are not in the "
                             f"dataset's {split} split, e.g. {stray[0].path!r} (label {stray[0].label})")


def _agrees(stored, actual) -> bool:
    """A manifest's label is the dataset's, up to entries it marks unknown (partial labels)."""
    if isinstance(stored, tuple) and isinstance(actual, tuple) and len(stored) == len(actual):
        return all(s == -1 or s == a for s, a in zip(stored, actual))
    return stored == actual


def few_shot_splits(dataset: DatasetSplits, shots: int, seed: int, allow_fewer: bool = False,
                    manifest: Optional[Union[str, Path]] = None) -> tuple[list[Item], list[Item]]:
    """(train, val) few-shot subsets over all classes: from a manifest when given, else sampled."""
    if manifest is not None:
        m = read_manifest(manifest)
        check_manifest(m, dataset, shots, where=f"data.manifest {manifest}")
        return m.train, m.val
    rng = random.Random(seed)  # one stream: the validation draw continues after the training draw
    train = sample_few_shot(dataset.train, shots, seed, allow_fewer, dataset.classnames, rng=rng)
    val = sample_validation(dataset.val, shots, seed, dataset.classnames, rng=rng)
    return train, val
