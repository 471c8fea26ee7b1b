"""Use an exported adapter: ``load_adapter`` -> an eval-mode model with its preprocessing;
``predict_files`` -> top-k labels and probabilities per image (``adapt predict``), as the adapter's
task reads its logits: a softmax for single-label, each class's own probability (and the classes
above 0.5) for multi-label, a label-map PNG per image (and the classes covering most pixels) for
segmentation.

    import adapt
    from PIL import Image
    model = adapt.load_adapter("runs/.../adapter", classnames=["cat", "dog"])   # new classes
    x = model.preprocess(Image.open("pet.jpg")).unsqueeze(0).to(model.device)
    probs = model.predict(x).softmax(-1)

Prompt adapters (CoOp, CoCoOp, KgCoOp, IVLP, MaPLe, ...) accept any class names; class-specific
ones (CSC CoOp, Tip-Adapter's cache, linear heads) refuse names they were not trained on, as the
method declares (``repointable``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import torch

from adapt.data.transforms import test_transform
from adapt.io import atomic_save
from adapt.methods import Method

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_adapter(path: str | Path, classnames: Optional[Sequence[str]] = None,
                 device: Optional[str | torch.device] = None, backbone=None, task: Optional[str] = None,
                 task_options: Optional[dict] = None) -> Method:
    """The adapter at ``path`` (an adapter directory, or a run directory holding ``adapter/``) on
    its backbone, in eval mode, on ``device`` (default: CUDA when available), re-pointed at
    ``classnames`` when given. ``model.preprocess`` maps a PIL image to the tensor it expects;
    ``model.device`` is where inputs go. ``backbone``: an already built one (else it is built
    from the name and weights the adapter records). ``task``: of an adapter trained on several
    datasets (``data.setting: multi_task``), the one to classify. ``task_options``: replace the
    task options the run recorded (a segmentation adapter's ``{"slide_window": [crop, stride]}``,
    the run's ``data.slide_window``, which ``predict_files`` slides as the run evaluated)."""
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.export import AdapterError, load_adapter as load_onto, read_adapter_meta
    from adapt.methods.adapters import adapter_folder

    path = adapter_folder(path)
    meta = read_adapter_meta(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backbone is None:
        if meta["backbone"]["pretrained"] is None:
            raise AdapterError(f"{path} was trained on a randomly initialised {meta['backbone']['name']} "
                               "(backbone.pretrained=null), which cannot be rebuilt here; pass the "
                               "backbone object it was trained with (backbone=...)")
        backbone = build_backbone(BackboneConfig(name=meta["backbone"]["name"],
                                                 pretrained=meta["backbone"]["pretrained"]))
    backbone = backbone.to(device)
    method = load_onto(path, backbone=backbone, classnames=classnames, task=task,
                       task_options=task_options).to(device).eval()
    # the task's evaluation transform where it has one (segmentation: the whole image, no crop)
    make = method.task.test_transform or test_transform
    method.preprocess = make(backbone.image_size, backbone.image_mean, backbone.image_std)
    method.device = device
    return method


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files, in order: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    return files


def predict_files(model: Method, inputs: Sequence[str | Path], top_k: int = 5, batch_size: int = 64,
                  progress: bool = True, maps_dir: Optional[str | Path] = None) -> list[dict]:
    """One row per image: path, then label_i / prob_i for the ``top_k`` most probable classes
    (the task's columns: ``present`` for multi-label; ``share_i`` and ``label_map`` for
    segmentation, whose maps are written into ``maps_dir``, default ``label_maps/``)."""
    from tqdm.auto import tqdm

    from adapt.data.image_dataset import load_image

    files = image_files(inputs)
    task = model.task
    maps_dir = Path("label_maps" if maps_dir is None else maps_dir)
    written: set[str] = set()
    rows = []
    device = getattr(model, "device", next(model.parameters()).device)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [load_image(f) for f in chunk]
        xs = [model.preprocess(im) for im in images]
        # whole images of different shapes (segmentation's test transform) go one at a time
        batches = [torch.stack(xs)] if len({x.shape for x in xs}) == 1 else [x[None] for x in xs]
        logits = []
        for x in batches:
            # test-time methods (TPT) take gradient steps inside predict; the rest need none;
            # the task infers as the run evaluated (segmentation: its sliding window, if any)
            with torch.set_grad_enabled(model.grad_at_test), torch.inference_mode(not model.grad_at_test):
                logits.append(task.infer(model.predict, x.to(device)))
        chunk_rows, maps = [], []
        for out, sub in zip(logits, _split(images, [len(x) for x in batches])):
            r, m = task.predictions(out, model.classnames, top_k, [(im.height, im.width) for im in sub])
            chunk_rows += r
            maps += m or []
        for i, (f, row) in enumerate(zip(chunk, chunk_rows)):
            row = {"path": str(f), **row}
            if maps:
                row["label_map"] = str(write_label_map(maps[i], _map_path(maps_dir, f, written)))
            rows.append(row)
        bar.update(len(chunk))
    bar.close()
    return rows


def _split(items: list, sizes: list[int]) -> list[list]:
    out, at = [], 0
    for n in sizes:
        out.append(items[at:at + n])
        at += n
    return out


MAPS_MARK = ".adapt-label-maps"  # proves a folder of label maps is adapt predict's own


def check_maps_dir(maps_dir: str | Path) -> Path:
    """``maps_dir`` may receive label maps: it is new or empty, or an earlier ``adapt predict``
    output (it holds ``.adapt-label-maps``); a folder of anything else is refused."""
    maps_dir = Path(maps_dir)
    if maps_dir.exists() and (not maps_dir.is_dir() or (any(maps_dir.iterdir()) and not (maps_dir / MAPS_MARK).is_file())):
        raise FileExistsError(f"{maps_dir} exists and is not a folder of label maps written by adapt "
                              "predict; choose another --maps-dir")
    return maps_dir


def _map_path(maps_dir: Path, image: Path, written: set[str]) -> Path:
    if not written:
        check_maps_dir(maps_dir).mkdir(parents=True, exist_ok=True)
        (maps_dir / MAPS_MARK).touch()
    name, n = f"{image.stem}.png", 1
    while name in written:  # two images with one stem (different folders) keep both maps
        name, n = f"{image.stem}_{n}.png", n + 1
    written.add(name)
    return maps_dir / name


def write_label_map(label_map, path: Path) -> Path:
    """A [H, W] uint8 class-index map as a single-channel PNG (mode L, readable by
    ``read_label_map``), written atomically."""
    from PIL import Image

    return atomic_save(path, lambda tmp: Image.fromarray(label_map, mode="L").save(tmp, format="PNG"))


def check_predictions_path(out: str | Path) -> Path:
    """``out`` may be written: it is new, or an earlier predictions CSV (header ``path,label_1``)."""
    out = Path(out)
    if out.exists():
        with open(out, newline="") as fh:
            header = fh.readline()
        if not header.startswith("path,label_1"):
            raise FileExistsError(f"{out} exists and is not a predictions CSV written by adapt; "
                                  "choose another --out")
    return out


def write_predictions(rows: Sequence[dict], out: str | Path) -> Path:
    """Write the CSV atomically; an existing file is replaced only if it is an earlier
    predictions file (its header starts with ``path,label_1``), never anything else."""
    out = check_predictions_path(out)
    fields = list(rows[0]) if rows else ["path", "label_1", "prob_1"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_save(out, write)


def export_plain_prompts(model: Method, out: str | Path) -> Path:
    """The adapter as plain tensors, loadable with ``safetensors.torch.load_file`` alone:

    - ``ctx``: the learned context vectors, [M, D] (shared) or [C, M, D] (class-specific), for
      methods built on text context (CoOp, CoCoOp, KgCoOp);
    - ``ctx_positions``: int64 [C, M], the token positions those vectors replace in each class's
      prompt ``"X X ... X <class name>."`` tokenized by the tokenizer named in the metadata;
    - ``state.<name>``: every trained tensor of the method under its own name (deep prompts per
      layer, meta-nets, couplings, ...);
    - metadata (strings): ``method``, ``tokenizer`` (open_clip.get_tokenizer(name)),
      ``backbone``, ``pretrained``, ``classnames`` (one per line), ``class_token_position``.
    """
    from safetensors.torch import save_file

    from adapt.methods.prompts import ContextPrompts

    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
    bb = model.backbone.config
    meta = {"format": "adapt-plain-prompts", "method": model.name, "tokenizer": bb.name,
            "backbone": bb.name, "pretrained": str(bb.pretrained), "classnames": "\n".join(model.classnames)}
    prompts = [m for m in model.modules() if isinstance(m, ContextPrompts)]
    if prompts:
        p = prompts[0]
        tensors["ctx"] = p.ctx.detach().cpu().clone()  # its own storage: safetensors refuses shared ones
        tensors["ctx_positions"] = context_positions(p.position, p.n_ctx, p.name_lens)
        meta["class_token_position"] = p.position
    return atomic_save(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def context_positions(position: str, n_ctx: int, name_lens: Sequence[int]) -> torch.Tensor:
    """[C, M] token indices of the context vectors (index 0 is the start-of-text token)."""
    rows = []
    half = n_ctx // 2
    for length in name_lens:
        if position == "end":
            rows.append(list(range(1, 1 + n_ctx)))
        elif position == "middle":
            rows.append(list(range(1, 1 + half)) + list(range(1 + half + length, 1 + n_ctx + length)))
        else:
            rows.append(list(range(1 + length, 1 + length + n_ctx)))
    return torch.tensor(rows, dtype=torch.int64)
