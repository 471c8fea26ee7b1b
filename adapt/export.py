"""Adapters on disk: ``adapter.safetensors`` (the method's trainable state) + ``adapter.json``.

Writing: both files atomically, the weights first, so the metadata (which names the weights'
hash) appears only once the weights it describes are complete; a state holding nan / inf is
refused. Reading and loading (checked, nothing unpickled) are ``adapt/methods/adapters.py``,
re-exported here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import save_file

from adapt.version import __version__
from adapt.finite import check_finite_state
from adapt.io import atomic_save, atomic_write_json
from adapt.methods import Method
from adapt.methods.adapters import (FORMAT, FORMAT_VERSION, META_FILE, REQUIRED_META, WEIGHTS_FILE,  # noqa: F401
                                    AdapterError, adapter_file, load_adapter, read_adapter_meta,
                                    read_adapter_state, sha256_of)


def save_adapter(method: Method, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in method.trainable_state().items()}
    check_finite_state(state, "adapter")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(out / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    extra = method.export_files()  # e.g. LoRA's peft adapter, readable without adapt
    for rel, blob in extra.items():
        target = adapter_file(out, rel, f"{method.name}.export_files()")  # what loading will accept
        atomic_save(target, lambda tmp, blob=blob: tmp.write_bytes(blob))
    bb = method.backbone.config
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights_sha256": sha256_of(out / WEIGHTS_FILE),
        "adapt_version": __version__,
        "method": method.name,
        "method_config": dataclasses.asdict(method.config),
        "task": method.task.name,  # what its labels are (adapt/tasks/); absent = single_label
        "backbone": {"name": bb.name, "pretrained": bb.pretrained, "embed_dim": method.backbone.embed_dim},
        "classnames": list(method.classnames),
        "templates": list(method.templates),
        "files": sorted(extra),
    }
    if method.class_text is not None:  # the sentences themselves: loading needs no file of the run
        meta["class_text"] = method.class_text.to_plain()
    if method.class_tasks is not None:  # trained on several datasets: the task of each class
        meta["class_tasks"] = list(method.class_tasks)
    if method.task.options():  # what changes its predictions (segmentation's sliding window)
        meta["task_options"] = method.task.options()
    atomic_write_json(out / META_FILE, meta)
    return out


def export_run(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Copy a finished run's adapter (weights + metadata, verified) to ``out_dir``."""
    from adapt.rundir import read_status

    src = Path(run_dir) / "adapter"
    out = Path(out_dir)
    if not (src / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{run_dir} has no adapter/{WEIGHTS_FILE}: {_why_no_adapter(Path(run_dir), read_status(run_dir))}")
    meta = read_adapter_meta(src)
    read_adapter_state(src, meta)  # never export a damaged or non-finite adapter
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out} is a file; give a folder to export the adapter into")
    if out.is_dir() and src.resolve() == out.resolve():
        raise AdapterError(f"{out} is the run's own adapter folder; export into another folder")
    if (out / WEIGHTS_FILE).exists() or (out / META_FILE).exists():
        if not overwrite:
            raise AdapterError(f"{out} already holds an adapter; pass --overwrite to replace it, or "
                               "choose another folder")
    # the method's extra files (LoRA's peft adapter): their names were checked by
    # read_adapter_meta, so asking whether they exist tells nothing about files outside src
    extra = [(src / rel, out / rel) for rel in meta.get("files", [])]
    for source, _ in extra:
        if not source.is_file():
            raise AdapterError(f"{source} is missing: the adapter is incomplete; export it again")
    for _, target in extra:  # a link already in ``out`` (out/peft -> elsewhere) must not lead out
        if not target.resolve().is_relative_to(out.resolve()):
            raise AdapterError(f"exporting into {out} would write {target} outside it (a link in {out} "
                               "leads elsewhere); remove that link or export into another folder")
    out.mkdir(parents=True, exist_ok=True)
    # weights first, metadata last: an interrupted export never pairs new metadata with old weights
    atomic_save(out / WEIGHTS_FILE, lambda tmp: tmp.write_bytes((src / WEIGHTS_FILE).read_bytes()))
    for source, target in extra:
        atomic_save(target, lambda tmp, source=source: tmp.write_bytes(source.read_bytes()))
    atomic_write_json(out / META_FILE, meta)
    return out


def _why_no_adapter(run_dir: Path, status: dict) -> str:
    state = status.get("state")
    if state == "diverged":
        return (f"the run diverged ({status.get('message', '')}); it has no usable adapter. Train "
                "it again with a lower optim.lr (overwrite=true moves this run aside)")
    if state in ("interrupted", "running") and (run_dir / "checkpoints").is_dir():
        return ("the run did not finish; continue it with "
                f"`adapt fit {run_dir / 'recipe.yaml'} resume=true`, then export")
    if (run_dir / "results.json").is_file():
        return "the method trains nothing (zero-shot or training-free), so there is no adapter to export"
    return "it is not a finished adapt run directory"
