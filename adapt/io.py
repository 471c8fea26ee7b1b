"""Atomic file writes: every file adapt writes (results, adapters, manifests, checkpoints, split
files) goes through here, so a crash or a kill mid-write leaves the old file intact, never a torn one.

A temporary file is written in the destination's folder (same file system, so the final
``os.replace`` is atomic), flushed to disk, given the mode an ordinary ``open()`` would have
given it (``tempfile`` creates files 0600; users expect their umask), then renamed into place.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, Path]


def _umask_mode() -> int:
    # the umask can only be read by setting it; restore it at once
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``). On any error
    the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it without syncing
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, **kwargs) -> Path:
    kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def atomic_save(path: PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` then rename: for library writers that take a path."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
