"""Reading adapters: ``adapter.safetensors`` (a method's trainable state) + ``adapter.json``.

Loading reads tensors with safetensors and metadata with json: nothing is unpickled. The
metadata records the weights file's sha256, which loading verifies, and loading refuses nan / inf
values. An adapter is checked against the backbone it is loaded onto and re-pointed at new class
names when the method allows it. Writing and exporting them is ``adapt/export.py``; this part
lives with the methods because a method may start from an adapter (TPT's ``init_from``).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapt.version import __version__
from adapt.backbone import BackboneConfig, ClipBackbone, build_backbone
from adapt.data.class_text import ClassText
from adapt.methods.base import Method
from adapt.methods.registry import build_method, method_config

log = logging.getLogger(__name__)

FORMAT = "adapt-adapter"
FORMAT_VERSION = 2  # 2: adapter.json records the weights' sha256
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
REQUIRED_META = ("format_version", "method", "method_config", "backbone", "classnames", "templates")


class AdapterError(ValueError):
    """An adapter that cannot be read, or does not fit what it is being loaded onto."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_file(adapter_dir: str | Path, rel, meta_path: str | Path) -> Path:
    """The path of an extra file that an adapter's metadata names (its ``"files"`` list): only a
    plain relative name inside ``adapter_dir`` -- no ``..``, not absolute, no link leading out.

    The one check for every reader of that list (load, export, predict), run on the name alone
    before anything is opened: adapter.json comes with the adapter, so a hand-made one could
    otherwise make ``adapt export`` copy ``~/.bashrc`` or write above its destination, and a
    "missing" answer would tell whether a file exists. Every bad form gets the same message."""
    adapter_dir = Path(adapter_dir)
    plain = (isinstance(rel, str) and rel and "\\" not in rel and "\0" not in rel
             and not PurePosixPath(rel).is_absolute() and not PureWindowsPath(rel).anchor
             and all(part not in ("", ".", "..") for part in rel.split("/")))
    if plain:
        try:  # a link in the folder may still lead out of it; strict=False: existence stays unread
            plain = (adapter_dir / rel).resolve().is_relative_to(adapter_dir.resolve())
        except (OSError, RuntimeError):  # a link loop
            plain = False
    if not plain:
        raise AdapterError(
            f"{meta_path} names the file {rel!r}, which is not a plain relative name inside the "
            "adapter folder (no '..', no absolute path, no link leading out of it): the adapter is "
            "malformed or untrusted, and adapt reads nothing it names. Do not use it; ask its author "
            "to export it again with `adapt export`")
    return adapter_dir / rel


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder ``path`` names: itself, or the ``adapter/`` of the run directory it is."""
    path = Path(path).expanduser()
    if not (path / META_FILE).is_file() and (path / "adapter" / META_FILE).is_file():
        return path / "adapter"
    return path


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: is {adapter_dir} an adapter directory written by "
                           "`adapt fit` or `adapt export`?")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the adapter's metadata is damaged: "
                           "export it again from its run directory") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterError(f"{path} is not an adapt adapter (format={found!r})")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise AdapterError(f"{path} lacks the field(s) {', '.join(missing)}; the metadata is "
                           "damaged or hand-edited: export the adapter again from its run directory")
    if meta["format_version"] > FORMAT_VERSION:
        raise AdapterError(f"{path} has format version {meta['format_version']}, newer than this "
                           f"adapt ({__version__}) reads ({FORMAT_VERSION}); upgrade adapt")
    files = meta.get("files", [])
    if not isinstance(files, list):
        raise AdapterError(f"{path}: \"files\" is {type(files).__name__}, not a list of file names: "
                           "the adapter is malformed or untrusted. Do not use it; ask its author to "
                           "export it again with `adapt export`")
    for rel in files:  # every reader goes through here: nothing it names is opened unchecked
        adapter_file(adapter_dir, rel, path)
    return meta


def read_adapter_state(adapter_dir: str | Path, meta: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked: the sha256 its metadata records, readable, finite."""
    adapter_dir = Path(adapter_dir)
    meta = meta or read_adapter_meta(adapter_dir)
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: the adapter's weights are missing")
    want = meta.get("weights_sha256")
    if want is None:
        log.warning("%s: format version %s records no checksum; the weights are not verified",
                    adapter_dir, meta["format_version"])
    elif sha256_of(path) != want:
        raise AdapterError(f"{path} does not match the sha256 recorded in {META_FILE}: the file "
                           "was changed or is damaged (truncated copy?); export it again")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file ({err}); it is damaged "
                           "(truncated copy?): export it again") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"{path} holds nan / inf values ({', '.join(bad[:5])}): it comes from a "
                           "diverged run and cannot be used")
    return state


def _class_text(meta: dict, adapter_dir) -> Optional[ClassText]:
    """The class text an adapter was trained with (its sentences, stored in its metadata)."""
    plain = meta.get("class_text")
    ok = plain is None or (isinstance(plain, dict) and all(
        isinstance(plain.get(k, {}), dict) and all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                                  for v in plain.get(k, {}).values())
        for k in ("descriptions", "descriptors")))
    if not ok:
        raise AdapterError(f"{Path(adapter_dir) / META_FILE}: \"class_text\" is not an object of class -> list of "
                           "sentences; the metadata is damaged or hand-edited: export the adapter again")
    return ClassText.from_plain(plain)


def _class_tasks(meta: dict, adapter_dir) -> Optional[list[str]]:
    """The task of every class of an adapter trained on several datasets (None: one task)."""
    tasks = meta.get("class_tasks")
    if tasks is not None and not (isinstance(tasks, list) and len(tasks) == len(meta["classnames"])
                                  and all(isinstance(t, str) for t in tasks)):
        raise AdapterError(f"{Path(adapter_dir) / META_FILE}: \"class_tasks\" is not one task name per class; "
                           "the metadata is damaged or hand-edited: export the adapter again")
    return tasks


def _task_kind(meta: dict, adapter_dir, override: Optional[dict]):
    """The adapter's task built with the options its run recorded (``Task.recorded_options``:
    segmentation's sliding window), ``override`` replacing them; an option the task does not
    record is refused."""
    from adapt.tasks import get_task, list_tasks

    name = meta.get("task", "single_label")
    cls = type(get_task(name))
    recorded = meta.get("task_options", {})
    if not (isinstance(recorded, dict) and set(recorded) <= set(cls.recorded_options)):
        raise AdapterError(f"{Path(adapter_dir) / META_FILE}: \"task_options\" is not an object of "
                           f"{name} options ({', '.join(cls.recorded_options) or 'it has none'}); the "
                           "metadata is damaged or hand-edited: export the adapter again")
    for key in override or {}:
        if key not in cls.recorded_options:
            owners = [t for t in list_tasks() if key in type(get_task(t)).recorded_options]
            raise ValueError(f"{key} configures {' / '.join(owners) or 'no'} adapters; this one is {name}")
    try:
        return get_task(name, **{**recorded, **(override or {})})
    except (TypeError, ValueError) as err:
        where = "the given options" if override else f"{Path(adapter_dir) / META_FILE}'s task_options"
        raise AdapterError(f"{where}: {err}") from None


def load_adapter(adapter_dir: str | Path, backbone: Optional[ClipBackbone] = None,
                 classnames: Optional[Sequence[str]] = None, task: Optional[str] = None,
                 task_options: Optional[dict] = None) -> Method:
    """Rebuild the exported method (on ``backbone``, or on the one it names) for ``classnames``
    (default: the classes it was trained on). ``task``: of an adapter trained on several datasets
    (multi_task), the one to classify: its classes, scored as that task's. ``task_options``:
    replace the task options its run recorded (``{"slide_window": [crop, stride]}``)."""
    meta = read_adapter_meta(adapter_dir)
    class_tasks = _class_tasks(meta, adapter_dir)
    kind = _task_kind(meta, adapter_dir, task_options)
    want = meta["backbone"]
    if backbone is None:
        backbone = build_backbone(BackboneConfig(name=want["name"], pretrained=want["pretrained"]))
    have = backbone.config
    if (have.name, have.pretrained) != (want["name"], want["pretrained"]) or backbone.embed_dim != want["embed_dim"]:
        raise AdapterError(
            f"adapter was exported for backbone {want['name']} / {want['pretrained']} but is being "
            f"loaded onto {have.name} / {have.pretrained}; build that backbone (or omit it and "
            "let load_adapter build it)")
    state = read_adapter_state(adapter_dir, meta)
    saved = dict(meta["method_config"])
    if saved.get("init_from"):  # where training started (PLOT's, SubPT's stage 1): the adapter holds
        saved["init_from"] = None  # where it ended, so that run need not exist where this one is loaded
    config = method_config(meta["method"], saved)
    method = build_method(meta["method"], config, backbone, meta["classnames"], meta["templates"],
                          task=kind, class_text=_class_text(meta, adapter_dir),
                          class_tasks=class_tasks)
    try:
        method.load_trainable_state(state)
    except ValueError as err:  # names the tensor and both shapes
        raise AdapterError(
            f"{adapter_dir}: its metadata names backbone {want['name']} / {want['pretrained']}, "
            f"but its tensors do not fit a {meta['method']} built on it ({err}); the adapter was "
            "made on another architecture, or its files were mixed up") from None
    if classnames is not None and list(classnames) != meta["classnames"]:
        if not method.repointable:
            raise AdapterError(
                f"this {meta['method']} adapter learned parameters for its own {len(meta['classnames'])} "
                f"classes ({', '.join(meta['classnames'][:5])}, ...) and cannot classify other class "
                "names; retrain it for your classes")
        method.set_classnames(classnames)
    if task is not None:
        trained = list(dict.fromkeys(class_tasks or []))
        if task not in trained:
            raise AdapterError(f"{adapter_dir}: task {task!r} is not one this adapter was trained on "
                               f"({', '.join(trained) if trained else 'it was trained on one dataset'}); "
                               "name one of those, or omit task")
        names = [c for c, t in zip(meta["classnames"], class_tasks) if t == task]
        method.set_classnames(names, [task] * len(names))
    return method.to(next(backbone.parameters()).device)
