"""Reading the pickles that some datasets ship as (CIFAR's python batches) without running code.

An unpickler looks up whatever callables the file names and calls them: a file from anywhere
could ask for ``os.system``. adapt never unpickles a data file with the default unpickler; this
one resolves only the names a numpy array needs and refuses everything else, before anything
is called, with one message that names the file and what it asked for.

The genuine CIFAR files (Python 2 ``cPickle``, protocol 2) are dicts of str / int lists / one
uint8 ndarray, so they name only numpy's ``_reconstruct``, ``ndarray`` and ``dtype``. Two more
names are allowed because a copy re-packed from Python 3 holding the same dict needs them:
protocol 5 writes arrays through ``_frombuffer``, and protocols 0-2 write bytes as
``_codecs.encode(text, 'latin1')`` (given here only as a latin-1 encoder: no other codec).
numpy 2 moved ``numpy.core`` to ``numpy._core``; files name either.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # what Python 3 emits for bytes at protocols 0-2; only the one codec such a file uses
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 is allowed)")
    return text.encode("latin1", errors)


def _allowed() -> dict[tuple[str, str], Any]:
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, wherever this version keeps it
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(0), 5)[0]
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                       ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names of ``_allowed``; any other global stops the load."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2 str -> str, as numpy expects
        self.path = path
        self.allowed = _allowed()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.path} asks to load {module}.{name}, which a dataset file never needs; it was "
                f"refused and nothing in the file was run. Replace the file with the dataset's "
                f"original (or re-pack it as a dict of lists and numpy arrays)")
        return found


class UnsafePickleError(pickle.UnpicklingError):
    pass


def load_pickle(path: Path) -> Any:
    """The object in ``path``, loaded with ``RestrictedUnpickler``; a file that is not a pickle
    (or a damaged one) gets one message naming it."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # the unpickler raises UnpicklingError, EOFError, ValueError, ...
            raise ValueError(f"{path} is not a readable pickle ({type(err).__name__}: {err}); it may "
                             f"be truncated or not the dataset's file: replace it with the original") from None
