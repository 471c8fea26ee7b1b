"""Class text beyond templates: sentences per class (CuPL's descriptions) and descriptor phrases
per class (VCD's), read from the JSON files a user passes as ``data.class_text``.

Both files map a class name to a list of strings: ``{"tench": ["a freshwater fish", ...]}``.
Keys are matched to the dataset's classes by normalised name (lower case, ``_`` as a space,
runs of white space as one), never by the file's order (VCD's Pets file lists its classes in
another order than the image folders: aligned by order, accuracy falls to chance, VCD#10).
Everything is checked here, once, against every class the run meets (training, validation,
novel and cross-dataset targets), before any model is built: a class missing from a file, a
class whose descriptions are empty, two keys that name one class, a list holding something
other than strings -- each named with the file and the fix. Keys naming no class of the run
are ignored (one ImageNet file serves ImageNet-V2 and -Sketch); how many is logged.

The result, ``ClassText``, is plain data (strings only): it travels with a checkpoint's hyper-
parameters and an adapter's metadata, so a run or an adapter is rebuilt without the files.
How sentences become a classifier (composition of descriptors, aggregation) belongs to the
methods (``adapt/methods/class_text.py``).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

_FORMATS = {
    "descriptions": 'sentences per class, CuPL\'s format: {"goldfish": ["A goldfish is a small orange fish.", ...]}',
    "descriptors": 'descriptor phrases per class, VCD\'s format: {"goldfish": ["orange scales", "a small fish"]}',
}


@dataclass
class ClassTextConfig:
    # JSON {class: [sentence, ...]}: each sentence is a prompt of its class as written (CuPL's
    # LLM descriptions); path relative to the working directory
    descriptions: Optional[str] = None
    # JSON {class: [phrase, ...]}: each phrase is composed with the class name into a prompt
    # ("tench, which has olive green scales": VCD's descriptors)
    descriptors: Optional[str] = None
    # with a file: put the templates' prompts into the same mean as the file's sentences (CuPL's
    # "both"); false: the file's sentences alone
    templates: bool = False


def normalised(name: str) -> str:
    """The form in which class names and file keys are compared."""
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip().lower()


@dataclass(frozen=True)
class ClassText:
    """Per class (by normalised name): its description sentences and its descriptor phrases,
    either may be absent; ``with_templates``: the templates' prompts join the same mean."""

    descriptions: dict = field(default_factory=dict)
    descriptors: dict = field(default_factory=dict)
    with_templates: bool = False

    def sentences_of(self, classname: str) -> list[str]:
        return list(self.descriptions.get(normalised(classname), ()))

    def descriptors_of(self, classname: str) -> Optional[list[str]]:
        """The class's phrases ([] when its list is empty), or None when no descriptor file."""
        if not self.descriptors:
            return None
        return list(self.descriptors.get(normalised(classname), ()))

    def covers(self, classname: str) -> bool:
        key = normalised(classname)
        return (not self.descriptions or key in self.descriptions) and (not self.descriptors or key in self.descriptors)

    def to_plain(self) -> dict:
        return {"descriptions": {k: list(v) for k, v in self.descriptions.items()},
                "descriptors": {k: list(v) for k, v in self.descriptors.items()},
                "with_templates": self.with_templates}

    @classmethod
    def from_plain(cls, plain: Optional[dict]) -> Optional["ClassText"]:
        if not plain:
            return None
        return cls({k: tuple(v) for k, v in plain.get("descriptions", {}).items()},
                   {k: tuple(v) for k, v in plain.get("descriptors", {}).items()},
                   bool(plain.get("with_templates", False)))


def load_class_text(cfg, classnames: Sequence[str]) -> Optional[ClassText]:
    """The checked class text of ``data.class_text`` for every class in ``classnames``, or None
    when the recipe names no file. Raises ValueError naming the file, the classes and the fix."""
    if cfg is None or not (cfg.descriptions or cfg.descriptors):
        if cfg is not None and cfg.templates:
            raise ValueError("data.class_text.templates=true adds the templates to the sentences of a "
                             "descriptions or descriptors file, and none is given: set "
                             "data.class_text.descriptions (or .descriptors), or drop templates")
        return None
    found = {}
    for kind in ("descriptions", "descriptors"):
        path = getattr(cfg, kind)
        if path:
            found[kind] = _read(kind, str(path), classnames)
    return ClassText(found.get("descriptions", {}), found.get("descriptors", {}), bool(cfg.templates))


def _fail(kind: str, path: str, problem: str) -> ValueError:
    return ValueError(f"data.class_text.{kind}={path}: {problem}")


def _read(kind: str, path: str, classnames: Sequence[str]) -> dict[str, tuple[str, ...]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise _fail(kind, path, f"no such file; give a JSON file of {_FORMATS[kind]}")
    objects: list[list] = []  # each object's (key, value) pairs; the outer one is decoded last
    try:  # pairs, not a dict: json.loads keeps the last of two equal keys without a word
        data = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=lambda kv: objects.append(kv) or dict(kv))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(kind, path, f"not valid JSON ({err}); the file holds {_FORMATS[kind]}") from None
    if not isinstance(data, dict):
        raise _fail(kind, path, f"the file holds a {type(data).__name__}, not an object of {_FORMATS[kind]}")
    top = objects[-1]
    by_key: dict[str, list[str]] = {}
    for key, _ in top:
        by_key.setdefault(normalised(key), []).append(key)
    clashes = [keys for keys in by_key.values() if len(keys) > 1]
    if clashes:
        shown = "; ".join(" / ".join(repr(k) for k in keys) for keys in clashes[:4])
        raise _fail(kind, path, f"{len(clashes)} class(es) appear under more than one key ({shown}); keys are "
                                "compared in lower case with '_' as a space: keep one list per class")
    entries = {normalised(k): v for k, v in top}
    wanted = {normalised(c): c for c in classnames}
    missing = [c for key, c in wanted.items() if key not in entries]
    if missing:
        close = _few(sorted(set(entries) - set(wanted)))
        raise _fail(kind, path, f"{len(missing)} of the {len(wanted)} classes have no entry: {_few(missing)}; add "
                                f"them (keys unused by this data: {close or 'none'})")
    out: dict[str, tuple[str, ...]] = {}
    empty = []
    for key in wanted:
        value = entries[key]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise _fail(kind, path, f"the entry of {wanted[key]!r} is not a list of strings: {str(value)[:80]}")
        sentences = tuple(s.strip() for s in value if s.strip())
        if not sentences:
            empty.append(wanted[key])
        out[key] = sentences
    if empty and kind == "descriptions":
        raise _fail(kind, path, f"classes {_few(empty)} have no sentence; a class needs at least one "
                                "(or leave them out of descriptions and use templates for all)")
    if empty:  # VCD's files have such classes on purpose (Food-101's donuts, VCD#9): the name alone
        log.warning("data.class_text.descriptors=%s: classes %s have no descriptor; each is scored by its "
                    "name alone, as the original does", path, _few(empty))
    unused = len(entries) - len(wanted)
    if unused:
        log.info("data.class_text.%s=%s: %d entries name no class of this run and are not used", kind, path, unused)
    return out


def _few(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
