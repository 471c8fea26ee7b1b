"""Checks of the selected images before any training time is spent.

Every training, validation and evaluation file is looked at once, up front: missing files are
always an error (a wrong ``data.root`` or path column, reported with the count and the first
few); unreadable files are an error or, with ``data.bad_images=skip``, left out and counted.
Training and validation images (few-shot: a handful per class) are fully decoded; evaluation
images get the cheap checks (PIL's header parse and ``verify``, and a JPEG's end-of-image marker,
which a truncated file lacks), so that a 50 000-image test set is checked in seconds. A record
of an array file (``<file>#<index>``, MNIST / CIFAR: ``records.py``) is always decoded: once its
file is read, that is an array lookup.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from adapt.data.items import Item, positives
from adapt.data.records import open_record, record_of

log = logging.getLogger(__name__)

BAD_IMAGES = ("error", "skip")
SHOWN = 5  # files named in a message


def image_problem(path: Path, decode: bool) -> Optional[str]:
    """Why ``path`` cannot be used as an image, or None."""
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
            else:
                fmt = image.format
                image.verify()
                if fmt == "JPEG" and not _ends_with_eoi(path):
                    return "truncated JPEG (no end-of-image marker)"
    except FileNotFoundError:
        return record_problem(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(err).__name__}: {err}"
    return None


def record_problem(path: Path) -> Optional[str]:
    """Why a path that is no file cannot be used as a record ``<file>#<index>``, or None. A
    record is always decoded: after its file's one read that is an array lookup."""
    record = record_of(path)
    if record is None or not record[0].is_file():
        return "missing"
    try:
        open_record(*record)
    except Exception as err:  # the array readers raise ValueError, IndexError, pickle errors
        return f"{type(err).__name__}: {err}"
    return None


def _ends_with_eoi(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64))
        tail = f.read()
    # padding after the marker (zero bytes, newlines) is common and harmless
    return b"\xff\xd9" in tail


def check_images(root: Path, splits: dict[str, Sequence[Item]], mode: str = "error",
                 decoded: Sequence[str] = ("train", "val")) -> dict[str, list[Item]]:
    """Return the splits without unreadable files (``mode='skip'``), or raise naming them.

    ``decoded``: the splits whose images are fully decoded (the others get the cheap checks)."""
    if mode not in BAD_IMAGES:
        raise ValueError(f"data.bad_images={mode!r} is not one of {', '.join(BAD_IMAGES)}")
    root = Path(root)
    missing: list[str] = []
    bad: dict[str, list[tuple[Item, str]]] = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for split, items in splits.items():
            decode = split in decoded
            problems = list(pool.map(lambda it: image_problem(root / it.path, decode), items))
            for item, problem in zip(items, problems):
                if problem == "missing":
                    missing.append(f"{split}: {item.path}")
                elif problem is not None:
                    bad.setdefault(split, []).append((item, problem))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image file(s) listed by the dataset do not exist under data.root={root}, "
            f"e.g. {'; '.join(missing[:SHOWN])}. Check data.root and the paths in the split / CSV file")
    n_bad = sum(len(v) for v in bad.values())
    if n_bad and mode == "error":
        shown = [f"{split}: {it.path} ({why})" for split, rows in bad.items() for it, why in rows][:SHOWN]
        raise ValueError(
            f"{n_bad} image file(s) cannot be read: {'; '.join(shown)}. Replace or remove them, or set "
            "data.bad_images=skip to leave them out (they are counted in results.json)")
    if n_bad:
        log.warning("data.bad_images=skip: leaving out %d unreadable image(s): %s", n_bad,
                    ", ".join(f"{s}: {len(v)}" for s, v in bad.items()))
    skipped = {s: {it for it, _ in rows} for s, rows in bad.items()}
    return {s: [it for it in items if it not in skipped.get(s, ())] for s, items in splits.items()}


def class_counts(items: Sequence[Item], classnames: Sequence[str]) -> dict[str, int]:
    counts = [0] * len(classnames)
    for it in items:
        for c in positives(it.label):  # a multi-label image counts for every class it shows
            counts[c] += 1
    return dict(zip(classnames, counts))


def warn_short_classes(counts: dict[str, int], shots: int) -> list[str]:
    """Classes with fewer than ``shots`` training images (``data.allow_fewer_shots``), warned by name."""
    short = [f"{name} ({n})" for name, n in counts.items() if shots > 0 and n < shots]
    if short:
        log.warning("data.allow_fewer_shots: %d class(es) have fewer than %d training images: %s",
                    len(short), shots, ", ".join(short[:20]) + (" ..." if len(short) > 20 else ""))
    return short
