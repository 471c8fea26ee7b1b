"""The IDX format of MNIST's files (LeCun's "file formats" note), read without torchvision.

A file is a big-endian header, then the values: 4 magic bytes ``0 0 <type> <ndim>`` (type 0x08 =
unsigned byte), ``ndim`` big-endian int32 sizes, then ``prod(sizes)`` values. MNIST's images
have magic 2051 (0x0803: bytes, [n, rows, cols]) and its labels 2049 (0x0801: bytes, [n]).
An uncompressed file is memory-mapped (a record costs no read until it is used); a ``.gz`` file
(or any gzip-compressed one) is decompressed into memory once. Both once per process.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from adapt.data.array_cache import once_per_file

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
NDIM = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}
KIND = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
GZIP_MAGIC = b"\x1f\x8b"
REFETCH = "download it again (or restore it from the original archive)"


def _bytes(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == GZIP_MAGIC:
        try:
            return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path} is a damaged gzip file ({err}); {REFETCH}") from None
    if path.stat().st_size == 0:  # mmap refuses an empty file
        return np.zeros(0, np.uint8)
    return np.memmap(path, np.uint8, mode="r")


@once_per_file
def read_idx(path: Path) -> np.ndarray:
    """The array of an MNIST IDX file (images [n, rows, cols] or labels [n], uint8)."""
    buf = _bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path} is truncated: {len(buf)} bytes, not even the 4-byte magic number; {REFETCH}")
    magic = int.from_bytes(bytes(buf[:4]), "big")
    if magic not in NDIM:
        raise ValueError(f"{path} has magic number {magic}, not MNIST's {IMAGES_MAGIC} (images) or "
                         f"{LABELS_MAGIC} (labels): it is not an IDX file of unsigned bytes; {REFETCH}")
    header = 4 + 4 * NDIM[magic]
    if len(buf) < header:
        raise ValueError(f"{path} is truncated inside its header ({len(buf)} of {header} bytes); {REFETCH}")
    shape = tuple(int.from_bytes(bytes(buf[4 + 4 * i:8 + 4 * i]), "big") for i in range(NDIM[magic]))
    expected, held = int(np.prod(shape)), len(buf) - header
    if held < expected:
        raise ValueError(f"{path} is truncated: its header announces {KIND[magic]} of shape {list(shape)} "
                         f"({expected} bytes) but it holds {held}; {REFETCH}")
    if held > expected:
        raise ValueError(f"{path} has {held - expected} bytes after the {KIND[magic]} of shape {list(shape)} "
                         f"its header announces: it is damaged; {REFETCH}")
    return buf[header:].reshape(shape)


def _read(path: Path, magic: int) -> np.ndarray:
    array = read_idx(path)
    if array.ndim != NDIM[magic]:
        other = IMAGES_MAGIC if magic == LABELS_MAGIC else LABELS_MAGIC
        raise ValueError(f"{path} holds {KIND[other]} (magic {other}) where MNIST's {KIND[magic]} file "
                         f"(magic {magic}) belongs: the files are swapped or misnamed; give each its "
                         f"original name")
    return array


def read_images(path: Path) -> np.ndarray:
    """[n, rows, cols] uint8 from an images file (magic 2051)."""
    return _read(path, IMAGES_MAGIC)


def read_labels(path: Path) -> np.ndarray:
    """[n] uint8 from a labels file (magic 2049)."""
    return _read(path, LABELS_MAGIC)
