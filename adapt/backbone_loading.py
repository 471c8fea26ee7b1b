"""Building an open_clip model from a recipe's ``backbone`` section, through open_clip's own loaders.

Accepted forms of ``name`` / ``pretrained``:

* a built-in or shipped model name + a pretrained tag (``ViT-B-16`` + ``openai``);
* a model name + a local checkpoint file (open_clip / safetensors state dicts, or the OpenAI
  ``.pt`` files the original CLIP code downloads: TorchScript archives or plain state dicts,
  rebuilt with QuickGELU as those weights need);
* ``hf-hub:org/repo`` or ``local-dir:/path`` (``pretrained`` is ignored, open_clip reads the config);
* ``pretrained: null`` — random initialisation, and only then.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import open_clip
import torch
from open_clip.model import build_model_from_openai_state_dict

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
WEIGHTS_DIR = PACKAGE_DIR / "weights"
_registered = False


@dataclass
class BackboneConfig:
    # open_clip model name (``ViT-B-16``, ``RN50``, a shipped tiny model) or ``hf-hub:``/``local-dir:``
    name: str = "ViT-B-16"
    # pretrained tag (``openai``, ``laion2b_s34b_b88k``), a checkpoint file path, or null (random init)
    pretrained: Optional[str] = "openai"
    # force QuickGELU; null = as the weights need (OpenAI weights use it)
    quick_gelu: Optional[bool] = None
    cache_dir: Optional[str] = None
    # encode at most this many prompts per text-tower pass (bounds memory for many classes);
    # 0 = off, null = automatic (see ``text_memory_plan``)
    text_chunk_size: Optional[int] = None
    # activation checkpointing while training (memory for compute): true = both towers' blocks,
    # false = off, null = automatic: the text tower's, when a pass would exceed text_memory_mb
    grad_checkpointing: Optional[bool] = None
    # activation memory (MiB) one text-tower pass with gradients may hold before the automatic
    # choices checkpoint and chunk it (1000-class CoOp on ViT-B/16 would need ~12 GB without)
    text_memory_mb: float = 2048.0
    # run open_clip's attention blocks through the wrapper's fused path (one q/k/v product,
    # scaled_dot_product_attention): same weights and results, a third less time on CPU; false =
    # open_clip's own block forward everywhere
    fast_blocks: bool = True
    # images per no-gradient image-tower pass; null = automatic (one pass, as measured fastest
    # on CPU), 0 = one pass
    image_chunk_size: Optional[int] = None


# fp32 vectors of the tower's width kept per token per block for the backward pass (LayerNorm
# inputs, q/k/v, attention output, the MLP's 4x hidden, ...; measured on ViT-B/16's text tower)
SAVED_VECTORS_PER_TOKEN = 16


def text_memory_plan(cfg, n_prompts: int, length: int, width: int, depth: int,
                     grad: bool, elem_bytes: int = 4) -> tuple[int, bool]:
    """``(chunk, checkpoint)`` for one text-tower pass of ``n_prompts`` sequences of ``length``.

    Explicit recipe values win. Automatic: checkpoint the blocks when the activations kept for
    the backward pass (estimated) exceed ``text_memory_mb``; then, or without gradients, cut the
    prompts into chunks whose one-block working set (recomputed in the backward pass) fits a
    sixteenth of it. With gradients and no checkpointing chunks would not lower the peak (every
    chunk's graph is kept), so none are cut.
    """
    budget = getattr(cfg, "text_memory_mb", 2048) * 2 ** 20
    per_block = length * width * elem_bytes * SAVED_VECTORS_PER_TOKEN  # one prompt, one block
    if cfg.grad_checkpointing is None:
        checkpoint = grad and n_prompts * per_block * depth > budget
    else:
        checkpoint = grad and bool(cfg.grad_checkpointing)
    if cfg.text_chunk_size is not None:
        return int(cfg.text_chunk_size), checkpoint
    fit = max(1, int(budget // 16 // max(1, per_block)))
    return (fit if (checkpoint or not grad) and n_prompts > fit else 0), checkpoint


def register_model_configs() -> None:
    """Make the model configs shipped in ``adapt/model_configs`` known to open_clip (once)."""
    global _registered
    if not _registered and MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def shipped_weights(name: str, tag: str) -> Optional[Path]:
    path = WEIGHTS_DIR / f"{name}-{tag}.safetensors"
    return path if path.is_file() else None


def load_open_clip(cfg: BackboneConfig):
    """Return ``(model, tokenizer, preprocess_cfg)``; raise a clear error for anything unloadable."""
    register_model_configs()
    name, pretrained = cfg.name, cfg.pretrained
    if name.startswith(("hf-hub:", "local-dir:")):
        model = open_clip.create_model(name, cache_dir=cfg.cache_dir)
    elif name not in open_clip.list_models():
        raise ValueError(_unknown_model_message(name))
    elif pretrained is None:
        log.warning("backbone %s: pretrained is null, using RANDOM weights", name)
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=bool(cfg.quick_gelu))
    elif shipped_weights(name, pretrained) is not None:
        model = open_clip.create_model(
            name, pretrained=str(shipped_weights(name, pretrained)), force_quick_gelu=bool(cfg.quick_gelu))
    elif open_clip.get_pretrained_cfg(name, pretrained):
        model = _from_tag(cfg)
    else:
        model = _from_file(cfg)
    model = model.float().eval()
    tokenizer = open_clip.get_tokenizer(name)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    preprocess_cfg.setdefault("size", getattr(model.visual, "image_size", 224))
    preprocess_cfg.setdefault("mean", getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    preprocess_cfg.setdefault("std", getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return model, tokenizer, preprocess_cfg


def _from_tag(cfg: BackboneConfig):
    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
    quick_gelu = tag_cfg.get("quick_gelu", False) if cfg.quick_gelu is None else cfg.quick_gelu
    try:
        return open_clip.create_model(
            cfg.name, pretrained=cfg.pretrained, force_quick_gelu=quick_gelu, cache_dir=cfg.cache_dir)
    except Exception as err:  # open_clip wraps download failures in RuntimeError
        raise RuntimeError(
            f"could not load pretrained weights {cfg.name!r} / {cfg.pretrained!r}: {err}\n"
            "If this machine is offline, copy the checkpoint here and set "
            "backbone.pretrained=/path/to/checkpoint (OpenAI .pt files work), or set "
            "backbone.cache_dir to where open_clip already cached it.") from None


def _from_file(cfg: BackboneConfig):
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        raise FileNotFoundError(
            f"backbone.pretrained={cfg.pretrained!r} is neither a pretrained tag of {cfg.name!r} "
            f"(known tags: {', '.join(tags) or 'none'}) nor an existing checkpoint file. "
            "Give a valid tag, a path to a checkpoint, or null for random weights.")
    openai_state = _openai_state_dict(path)
    if openai_state is not None:
        # The original CLIP release: the architecture is read off the weights, with QuickGELU.
        log.info("loading OpenAI-format checkpoint %s", path)
        model = build_model_from_openai_state_dict(openai_state, quick_gelu=True, cast_dtype=None)
        model.visual.image_mean, model.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        return model
    return open_clip.create_model(cfg.name, pretrained=str(path), force_quick_gelu=bool(cfg.quick_gelu))


def _openai_state_dict(path: Path) -> Optional[dict]:
    """The weights of an OpenAI-format file (TorchScript archive, or unwrapped fp16 state dict), or
    None for anything else (open_clip / safetensors checkpoints go through open_clip's loader)."""
    if _is_torchscript(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    elif path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        scale = state.get("logit_scale") if isinstance(state, dict) else None
        if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float16):
            return None  # open_clip saves fp32; OpenAI's release is fp16
    else:
        return None
    # scalars and masks that TorchScript archives carry beside the weights
    drop = ("input_resolution", "context_length", "vocab_size", "attn_mask")
    return {k: v for k, v in state.items() if k not in drop}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _unknown_model_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"unknown open_clip model {name!r}.{hint} See open_clip.list_models(), or use "
            "hf-hub:org/repo or local-dir:/path.")
