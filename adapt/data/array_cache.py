"""Array files decoded once per process (``once_per_file``).

Datasets that ship as array files (CIFAR's pickles, MNIST's IDX files) are read whole: item
``k`` of a 50 000-image file must not re-read the file. A reader decorated here runs once per
file and process; later calls return the same object while the file keeps its size and
modification time (a replaced file is read anew). The loader reads the files in the main
process to learn the labels, so DataLoader workers forked from it start with the cache filled.
A lock keeps the image checks' threads from decoding one file twice.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
_LOCK = threading.RLock()


def once_per_file(reader: Callable[[Path], T]) -> Callable[[Path], T]:
    cache: dict[str, tuple[tuple[int, int, int], T]] = {}

    @functools.wraps(reader)
    def read(path: Path) -> T:
        key = os.path.abspath(path)  # no resolve(): it costs several system calls per item
        st = os.stat(key)  # FileNotFoundError names the path
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with _LOCK:
            hit = cache.get(key)
            if hit is None or hit[0] != stamp:
                hit = cache[key] = (stamp, reader(Path(path)))
            return hit[1]

    read.cache_clear = cache.clear  # tests
    return read
