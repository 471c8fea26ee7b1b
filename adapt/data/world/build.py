"""Materialise a world task to disk: PNG files plus the task's split file (``task.write``): a
split JSON in the community "zhou" format ``{"train": [[relative_path, label, classname], ...],
"val": [...], "test": [...]}`` for one-object tasks, a ``multilabel_csv`` file for multi-object
ones (``multi.py``).

The folder is written next to its final place (in adapt's cache, never in a user's folder) and
renamed into it in one step, so a crashed or concurrent build never leaves a half-written dataset
behind; an existing complete folder is reused as is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from adapt.data.world.tasks import WorldTask, get_task

DEFAULT_SEED = 0


def cache_root() -> Path:
    """``$ADAPT_WORLD_CACHE`` if set, else ``$ADAPT_CACHE_DIR/world``, else ``~/.cache/adapt/world``."""
    env = os.environ.get("ADAPT_WORLD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("ADAPT_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "adapt") / "world"


def split_file_name(task: WorldTask) -> str:
    return task.split_file


def default_folder(task: WorldTask, seed: int = DEFAULT_SEED) -> Path:
    return cache_root() / f"{task.name}-v{task.version}-seed{seed}"


def is_complete(folder: Path, task: WorldTask, seed: Optional[int] = None) -> bool:
    """The folder holds this very task (same fingerprint, and seed if given), fully written."""
    split = folder / task.split_file
    if not split.is_file():
        return False
    try:
        meta = json.loads((folder / "world.json").read_text())
        counts = task.count_rows(split)
    except (OSError, ValueError, KeyError):
        return False
    if meta.get("fingerprint") != task.fingerprint() or (seed is not None and meta.get("seed") != seed):
        return False
    return counts == task.expected_rows()


# written into every build: the proof that adapt made the folder, checked before any removal
MARKER = ".adapt-world-build"


def materialise(task: Union[str, WorldTask], root: Optional[Union[str, Path]] = None,
                seed: int = DEFAULT_SEED) -> Path:
    """Return the folder holding ``task``'s images and split JSON, writing it if needed.

    Generated data lives in adapt's own cache (``<cache_root()>/<task>-v<version>-seed<seed>``),
    never in a user's folder. ``root`` (a recipe's ``data.root``) may name a complete build of
    this task made earlier (a copied cache folder), which is read as is; any other folder is an
    error, and nothing is written into it. A cache folder from an older definition of the task is
    rebuilt only if it carries adapt's build marker.
    """
    if isinstance(task, str):
        task = get_task(task)
    if root:
        folder = Path(root).expanduser()
        if is_complete(folder, task, seed):
            return folder
        raise ValueError(
            f"data.root={str(root)!r} is not a generated build of the world task {task.name!r} "
            f"(no complete {split_file_name(task)} / world.json from adapt in it). World tasks are "
            f"generated into adapt's cache ({cache_root()}), never into your folder: drop data.root "
            "to use the cache, or, if the folder holds your own images, set data.dataset=imagefolder "
            "(or csv / zhou) to train on them. Nothing in the folder was changed.")
    return build_folder(default_folder(task, seed), lambda tmp: task.write(tmp, seed),
                        lambda folder: is_complete(folder, task, seed), {"task": task.name, "seed": seed})


def build_folder(folder: Path, write: Callable[[Path], None], complete: Callable[[Path], bool],
                 marker: dict) -> Path:
    """``folder`` once ``complete`` says it is, written by ``write`` into a temporary sibling
    and renamed into place (with adapt's build marker) when it is not: a crashed or concurrent
    build never leaves a half-written folder. Generated support sets and pools use it too."""
    if complete(folder):
        return folder
    _refuse_unproven(folder)  # before rendering thousands of images for nothing
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(marker))
        if folder.exists():
            if complete(folder):  # another process finished first
                return folder
            _refuse_unproven(folder)
            shutil.rmtree(folder)  # adapt's own partial or outdated build (marker checked)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not complete(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _refuse_unproven(folder: Path) -> None:
    """A non-empty folder without adapt's build marker is not adapt's to replace."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise FileExistsError(f"{folder} exists, is not empty and was not written by adapt (no "
                              f"{MARKER} marker); move it away or set ADAPT_WORLD_CACHE to another folder")
