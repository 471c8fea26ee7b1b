"""Adapters on disk: ``adapter.safetensors`` (the method's trainable state) + ``adapter.json``.

Loading reads tensors with safetensors and metadata with json: nothing is unpickled. An adapter
is checked against the backbone it is loaded onto and re-pointed at new class names when the
method allows it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from safetensors.torch import load_file, save_file

import adapt
from adapt.backbone import BackboneConfig, ClipBackbone, build_backbone
from adapt.methods import Method, build_method, method_config

FORMAT = "adapt-adapter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


class AdapterError(ValueError):
    """An adapter that does not fit what it is being loaded onto."""


def save_adapter(method: Method, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in method.trainable_state().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    bb = method.backbone.config
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapt_version": adapt.__version__,
        "method": method.name,
        "method_config": dataclasses.asdict(method.config),
        "backbone": {"name": bb.name, "pretrained": bb.pretrained, "embed_dim": method.backbone.embed_dim},
        "classnames": list(method.classnames),
        "templates": list(method.templates),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: is {adapter_dir} an adapter directory written by "
                           "`adapt fit` or `adapt export`?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not an adapt adapter (format={meta.get('format')!r})")
    return meta


def load_adapter(adapter_dir: str | Path, backbone: Optional[ClipBackbone] = None,
                 classnames: Optional[Sequence[str]] = None) -> Method:
    """Rebuild the exported method (on ``backbone``, or on the one it names) for ``classnames``
    (default: the classes it was trained on)."""
    meta = read_adapter_meta(adapter_dir)
    want = meta["backbone"]
    if backbone is None:
        backbone = build_backbone(BackboneConfig(name=want["name"], pretrained=want["pretrained"]))
    have = backbone.config
    if (have.name, have.pretrained) != (want["name"], want["pretrained"]) or backbone.embed_dim != want["embed_dim"]:
        raise AdapterError(
            f"adapter was exported for backbone {want['name']} / {want['pretrained']} but is being "
            f"loaded onto {have.name} / {have.pretrained}; build that backbone (or omit it and "
            "let load_adapter build it)")
    config = method_config(meta["method"], meta["method_config"])
    method = build_method(meta["method"], config, backbone, meta["classnames"], meta["templates"])
    method.load_trainable_state(load_file(str(Path(adapter_dir) / WEIGHTS_FILE)))
    if classnames is not None and list(classnames) != meta["classnames"]:
        if not method.repointable:
            raise AdapterError(
                f"this {meta['method']} adapter learned parameters for its own {len(meta['classnames'])} "
                f"classes ({', '.join(meta['classnames'][:5])}, ...) and cannot classify other class "
                "names; retrain it for your classes")
        method.set_classnames(classnames)
    return method.to(next(backbone.parameters()).device)


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """Copy a finished run's adapter (weights + metadata, checked) to ``out_dir``."""
    import shutil

    src = Path(run_dir) / "adapter"
    if not (src / WEIGHTS_FILE).is_file():
        raise AdapterError(
            f"{run_dir} has no adapter/{WEIGHTS_FILE}: either the method trains nothing (zero-shot) "
            "or the run did not finish; finish it with `adapt fit <recipe> resume=true`")
    read_adapter_meta(src)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, META_FILE):
        shutil.copy2(src / name, Path(out_dir) / name)
    return Path(out_dir)
