"""Unlabelled target images and label priors: the inputs of methods that learn without labels
(CLIPPR's prior on the label distribution; later MUST's uniform fairness target).

``data.unlabelled`` has two fields:

- ``folder``: a folder of images (searched recursively, any layout) that replaces the dataset's
  training split as the unlabelled pool of ``data.setting=unsupervised``. Without it the pool
  is the training split with its labels dropped (the world's train split, CIFAR-10's 50,000).
  ``adapt.data.folder.unlabelled_folder_paths`` lists them (SVL-Adapter pretrains its SimCLR
  encoder on them).
- ``prior``: ``uniform``, or a JSON file ``{class: weight}`` giving the share of each class in
  the unlabelled data. Keys are matched to the classes by normalised name
  (``adapt.data.class_text.normalised``: lower case, ``_`` as a space), never by order.

A prior file is checked here, once, against the training classes, before any model loads:
invalid JSON, a value that is not a number, a negative weight, a key naming no class, a class
without a key, two keys naming one class, weights not summing to one (within 1e-6) -- each one
message naming the file and the fix. Weights are never renormalised silently: CLIPPR's original
divides by their sum, which turns a typo (a missing zero) into a different prior without a word.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from adapt.data.class_text import _few, normalised

SUM_TOLERANCE = 1e-6
_FORMAT = 'uniform, or a JSON file of class shares summing to one: {"airplane": 0.1, "automobile": 0.1, ...}'


@dataclass
class UnlabelledConfig:
    # a folder of unlabelled target images (recursive; any layout) used in place of the training
    # split by data.setting=unsupervised; null = the training split with its labels dropped
    folder: Optional[str] = None
    # the label prior of the unlabelled data: "uniform", or a JSON file {class: share} summing to
    # one (path relative to the working directory); null = none given
    prior: Optional[str] = None


def _fail(path: str, problem: str) -> ValueError:
    return ValueError(f"data.unlabelled.prior={path}: {problem}")


def load_label_prior(spec: Optional[str], classnames: Sequence[str]) -> Optional[list[float]]:
    """The prior's share of each class of ``classnames`` (in that order), or None when none is
    given. Raises ValueError naming the file, the problem and the fix."""
    if spec in (None, ""):
        return None
    if str(spec).strip().lower() == "uniform":
        return [1.0 / len(classnames)] * len(classnames)
    path = str(spec)
    file = Path(path).expanduser()
    if not file.is_file():
        raise _fail(path, f"no such file; give {_FORMAT}")
    pairs: list[list] = []  # the outer object's (key, value) pairs, kept to see repeated keys
    try:
        data = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=lambda kv: pairs.append(kv) or dict(kv))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"not valid JSON ({err}); the file holds {_FORMAT}") from None
    if not isinstance(data, dict):
        raise _fail(path, f"the file holds a {type(data).__name__}, not an object of {_FORMAT}")
    shares: dict[str, float] = {}
    for key, value in pairs[-1]:
        # bool is an int to Python, and NaN / inf parse as JSON numbers: neither is a share
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(path, f"the weight of {key!r} is {value!r}, not a finite number")
        if normalised(key) in shares:
            raise _fail(path, f"two keys name the class {normalised(key)!r} (keys are compared in lower case "
                              "with '_' as a space); keep one")
        shares[normalised(key)] = float(value)
    negative = [k for k, v in shares.items() if v < 0]
    if negative:
        raise _fail(path, f"weights must be >= 0; negative for {_few(negative)}")
    wanted = {normalised(c): c for c in classnames}
    unknown = sorted(set(shares) - set(wanted))
    if unknown:
        raise _fail(path, f"{len(unknown)} key(s) name no class of this data: {_few(unknown)}; the classes are "
                          f"{_few(list(classnames))}")
    missing = [c for k, c in wanted.items() if k not in shares]
    if missing:
        raise _fail(path, f"{len(missing)} of the {len(wanted)} classes have no weight: {_few(missing)}; give "
                          "every class one (0 for a class absent from the data)")
    total = math.fsum(shares.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise _fail(path, f"the weights sum to {total:.9g}, not 1 (within {SUM_TOLERANCE:g}); divide each by "
                          "their sum (they are not renormalised for you)")
    return [shares[normalised(c)] for c in classnames]
