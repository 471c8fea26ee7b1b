"""Building an open_clip model from a recipe's ``backbone`` section, through open_clip's own loaders.

Accepted forms of ``name`` / ``pretrained``:

* a built-in or shipped model name + a pretrained tag (``ViT-B-16`` + ``openai``);
* a model name + a local checkpoint file: a state dict (torch or safetensors, any dtype, plain
  or in a training checkpoint's ``state_dict``) whose shapes fit the named model is loaded into
  it, with the name's activation; the OpenAI ``.pt`` files the original CLIP code downloads
  (TorchScript archives) and plain state dicts in OpenAI's layout (told by their keys, never the
  dtype) of a size no model config has are rebuilt from their weights with QuickGELU, as those
  weights need; a state dict that fits another config is an error naming the configs it fits;
* ``hf-hub:org/repo`` or ``local-dir:/path`` (``pretrained`` is ignored, open_clip reads the config);
* ``pretrained: null`` — random initialisation, and only then.

``text_tower`` finds the built model's text tower, wherever its class keeps it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub (``HF_ENDPOINT``) be reached? A few seconds at most, where
    huggingface_hub's own retries take about a minute to give up on an offline machine."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub's offline mode for one call: cached files load, nothing is requested."""
    import huggingface_hub.constants as hub

    old, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old


def _from_tag(cfg: BackboneConfig):
    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
    quick_gelu = tag_cfg.get("quick_gelu", False) if cfg.quick_gelu is None else cfg.quick_gelu
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            return open_clip.create_model(
                cfg.name, pretrained=cfg.pretrained, force_quick_gelu=quick_gelu, cache_dir=cfg.cache_dir)
    except Exception as err:  # open_clip wraps download failures in RuntimeError
        why = "the hub is not reachable from this machine and they are not in the local cache" if not online else err
        raise RuntimeError(
            f"could not load pretrained weights {cfg.name!r} / {cfg.pretrained!r}: {why}.\n"
            "If this machine is offline, copy the checkpoint here and set "
            "backbone.pretrained=/path/to/checkpoint (OpenAI .pt files work), or set "
            "backbone.cache_dir to where open_clip already cached it.") from None


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# top-level keys of the original CLIP's state dict (open_clip's CLIP class keeps the same names)
CLIP_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")


def known_tags(name: str) -> list[str]:
    """open_clip's pretrained tags of ``name`` plus the weights shipped with adapt."""
    shipped = [p.stem[len(name) + 1:] for p in WEIGHTS_DIR.glob(f"{name}-*.safetensors")]
    return sorted(set(open_clip.list_pretrained_tags_by_model(name)) | set(shipped))


def _from_file(cfg: BackboneConfig):
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        tags = ", ".join(known_tags(cfg.name)) or "none"
        if path.suffix in CHECKPOINT_SUFFIXES or os.sep in cfg.pretrained:
            raise FileNotFoundError(
                f"checkpoint file {str(path)!r} not found (backbone.pretrained). Give an existing "
                f"file, a pretrained tag of {cfg.name!r} ({tags}), or null for random weights.")
        raise FileNotFoundError(
            f"backbone.pretrained={cfg.pretrained!r} is neither a pretrained tag of {cfg.name!r} "
            f"(known tags: {tags}) nor an existing checkpoint file. "
            "Give a valid tag, a path to a checkpoint, or null for random weights.")
    if _is_torchscript(path):  # the original CLIP release: architecture read off the weights
        return _openai_model(torch.jit.load(str(path), map_location="cpu").state_dict(), path, cfg)
    state = _read_state_dict(path)
    named = open_clip.create_model(cfg.name, pretrained=None, force_quick_gelu=bool(cfg.quick_gelu))
    if _fits(named, state):
        named.load_state_dict(state, strict=False)  # _fits checked every key of the model
        return named
    fitting = architectures_fitting(state)
    if not fitting and all(k in state for k in CLIP_KEYS) and any(k.startswith("visual.") for k in state):
        # OpenAI's layout (any dtype) of a size no model config has: read off the weights
        return _openai_model(state, path, cfg)
    hint = (f" Its shapes fit {', '.join(fitting)}: set backbone.name to one of them (OpenAI's own "
            "weights need QuickGELU: a -quickgelu name or backbone.quick_gelu=true)." if fitting
            else " Its shapes fit none of open_clip's model configs.")
    raise ValueError(f"checkpoint {path} holds weights of another architecture than {cfg.name!r}."
                     f"{hint} (backbone.pretrained)")


def _read_state_dict(path: Path) -> dict:
    """A checkpoint's tensors (weights-only loads), unwrapped from training checkpoints."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: it is not a torch or safetensors file of "
                         f"model weights ({type(err).__name__}: {str(err).split('. ')[0][:120]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"cannot read checkpoint {path}: it holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fits(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return all(k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in own.items())


def _openai_model(state: dict, path: Path, cfg: BackboneConfig):
    # scalars and masks that TorchScript archives carry beside the weights
    drop = ("input_resolution", "context_length", "vocab_size", "attn_mask")
    state = {k: v for k, v in state.items() if k not in drop}
    quick_gelu = True if cfg.quick_gelu is None else cfg.quick_gelu  # OpenAI's weights use QuickGELU
    log.info("loading OpenAI-format checkpoint %s (architecture read off the weights)", path)
    model = build_model_from_openai_state_dict(state, quick_gelu=quick_gelu, cast_dtype=None)
    model.visual.image_mean, model.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    return model


def _state_dims(state: dict) -> dict:
    def layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    dims = {}
    if "visual.conv1.weight" in state and "visual.positional_embedding" in state:
        w = state["visual.conv1.weight"]
        grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        dims.update(v_width=w.shape[0], patch=w.shape[-1], v_layers=layers("visual.transformer.resblocks."),
                    image=grid * w.shape[-1])
    if "token_embedding.weight" in state:
        dims.update(t_width=state["token_embedding.weight"].shape[1], t_layers=layers("transformer.resblocks."))
    if "text_projection" in state:
        dims["embed"] = state["text_projection"].shape[-1]
    return dims


def architectures_fitting(state: dict, limit: int = 6) -> list[str]:
    """open_clip model names whose config has the widths, depths and patch size of ``state``."""
    have = _state_dims(state)
    if not have:
        return []
    found = []
    for name in open_clip.list_models():
        c = open_clip.get_model_config(name) or {}
        v, t = c.get("vision_cfg", {}), c.get("text_cfg", {})
        if not isinstance(v.get("layers"), int):
            continue
        want = {"v_width": v.get("width"), "patch": v.get("patch_size"), "v_layers": v.get("layers"),
                "image": v.get("image_size"), "t_width": t.get("width"), "t_layers": t.get("layers"),
                "embed": c.get("embed_dim")}
        if all(want.get(k) == val for k, val in have.items()):
            found.append(name)
    return found[:limit]


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


class TextTower:
    """A view of the text-tower attributes, wherever the model keeps them (CLIP vs CustomTextCLIP)."""

    def __init__(self, owner: torch.nn.Module):
        self.owner = owner

    def __getattr__(self, name):
        # only called for names not found normally; ``copy``/``pickle`` call it on an instance
        # built without __init__, before ``owner`` exists
        owner = self.__dict__.get("owner")
        if owner is None or name.startswith("__"):
            raise AttributeError(name)
        aliases = {"pool_type": "text_pool_type", "eos_id": "text_eos_id"}
        if hasattr(owner, name):
            return getattr(owner, name)
        return getattr(owner, aliases.get(name, name), None)


def text_tower(model: torch.nn.Module) -> TextTower:
    owner = model.text if hasattr(model, "text") else model
    if not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
        raise TypeError(
            f"text tower {type(owner).__name__} does not expose token embeddings and a transformer "
            "block list; prompt methods need open_clip's own text transformer")
    if getattr(owner, "cls_emb", None) is not None:
        raise TypeError("text towers with a CLS embedding (CoCa-style) are not supported")
    return TextTower(owner)
