"""Frozen image features, computed once and kept on disk.

Methods that only read frozen image features (``Method.supports_feature_cache``: CoOp, CoCoOp,
KgCoOp, feature adapters, zero-shot) never need the image encoder inside the training loop; the
data module then serves their batches from here. Their features are computed once per (backbone, dataset split, transform) and stored under a key that
hashes everything that determines them: the backbone's name, tag and a digest of its current weights, the
dataset's name and root, the item list (paths, labels, file sizes and modification times), the
transform's repr, the view seed, and the package versions. Anything changed gives a new key; the
old entry is never read again (``stale_entries`` lists such superseded entries, ``prune`` removes
them).

Training under augmentation uses ``views`` augmented views per image. View ``v`` of an image is a
pure function of (seed, v, the image's path): the transform's random draws are seeded per view
and image, so a cache of 20 views holds the first 10 of a 10-view request (it is sliced, not
recomputed) and the uncached path can reproduce any cached view exactly (``ViewDataset``).
``EpochViewSampler`` hands each image a different one of its views every epoch.

Files: ``<dir>/<key>.safetensors`` (``features`` [views, n, d], ``labels`` [n]) and
``<dir>/<key>.json`` (the manifest: every fingerprint component, shapes, size). Both are written
to a temporary file and renamed, the manifest last, so a reader sees complete entries or none;
concurrent writers (several runs, DDP ranks) take a per-key lock and the later ones reuse the
first one's result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from adapt.data.image_dataset import load_image
from adapt.data.items import Item, as_target
from adapt.data.records import source_file

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_VIEW_SEED = 0


def default_cache_dir() -> Path:
    """``$ADAPT_CACHE_DIR/features``, else ``$XDG_CACHE_HOME/adapt/features``, else
    ``~/.cache/adapt/features``."""
    if os.environ.get("ADAPT_CACHE_DIR"):
        return Path(os.environ["ADAPT_CACHE_DIR"]).expanduser() / "features"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "adapt" / "features"


# ------------------------------------------------------------------------------ fingerprint ---
def weights_digest(backbone) -> str:
    """A digest of every tensor of the model (names, shapes, dtypes, bytes). Recomputed whenever
    the model may have changed since the last one: a tensor replaced, added or removed (an
    injected adapter), or written in place (torch's version counter moves with every in-place
    update, an optimizer step included); so features are never read from an entry made with
    other weights."""
    state = backbone.model.state_dict(keep_vars=True)
    stamp = tuple((name, t.data_ptr(), t._version) for name, t in sorted(state.items()))
    cached = backbone.__dict__.get("_feature_cache_digest")
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    backbone.__dict__["_feature_cache_digest"] = (stamp, digest)
    return digest


def items_digest(items: Sequence[Item], root: Union[str, Path]) -> str:
    """Paths, labels and each file's size and modification time (a regenerated image under the
    same name invalidates the entry)."""
    h = hashlib.blake2b(digest_size=16)
    root = Path(root)
    for item in items:
        try:
            st = source_file(root / item.path).stat()  # a record: its array file's stamp
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{item.path}\t{item.label}\t{stamp}\n".encode())
    return h.hexdigest()


def fingerprint(backbone, items: Sequence[Item], root: Union[str, Path], transform, *,
                dataset: str = "", split: str = "", normalize: bool = True,
                seed: int = DEFAULT_VIEW_SEED, dense: Sequence[str] = (),
                dtype: torch.dtype = torch.float32) -> dict:
    """Everything that determines the features of ``items`` (except the number of views, which
    only decides how many of the same sequence of views are stored). ``dense``: the dense
    outputs stored instead of the pooled feature (``adapt/dense.py``); ``dtype``: the storage
    type. Both enter the key only when not the default, so pooled entries keep their keys."""
    import open_clip

    from adapt.version import __version__

    cfg = backbone.config
    extra = {"dense": list(dense)} if dense else {}
    if dtype != torch.float32:
        extra["storage"] = str(dtype)
    return {**extra,
        "format": FORMAT,
        "backbone": {"name": str(cfg.name), "pretrained": None if cfg.pretrained is None else str(cfg.pretrained),
                     "quick_gelu": cfg.quick_gelu, "weights": weights_digest(backbone),
                     "dtype": str(backbone.dtype)},
        "dataset": {"name": dataset, "root": str(Path(root).expanduser().resolve()), "split": split},
        "items": {"count": len(items), "digest": items_digest(items, root)},
        "transform": repr(transform),
        "normalize": bool(normalize),
        "view_seed": int(seed),
        "versions": {"adapt": __version__, "open_clip": open_clip.__version__},
    }


def key_of(components: dict) -> str:
    blob = json.dumps(components, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ------------------------------------------------------------------------------ views ---------
def view_seed(seed: int, view: int, path: str) -> int:
    digest = hashlib.blake2b(f"{seed}\0{view}\0{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class ViewDataset(Dataset):
    """Index ``k`` is view ``views[k // n]`` of item ``k % n``; returns (image, label, view, index).

    The transform's random draws (torchvision uses the global torch generator) are seeded by
    (seed, view, path), inside a forked RNG so the caller's random state is untouched."""

    def __init__(self, items: Sequence[Item], root: Union[str, Path], transform: Optional[Callable],
                 views: Sequence[int] = (0,), seed: int = DEFAULT_VIEW_SEED):
        self.items, self.root, self.transform = list(items), Path(root), transform
        self.views, self.seed = list(views), int(seed)

    def __len__(self) -> int:
        return len(self.items) * len(self.views)

    def __getitem__(self, k: int):
        view, index = self.views[k // len(self.items)], k % len(self.items)
        item = self.items[index]
        image = load_image(self.root / item.path)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, view, item.path))
                image = self.transform(image)
        return image, as_target(item.label), view, index


# ------------------------------------------------------------------------------ the store -----
@dataclass
class CachedFeatures:
    features: torch.Tensor  # [views, n, d] float
    labels: torch.Tensor  # [n] long, or [n, K] multi-hot (1 / 0 / -1 unknown)
    key: str
    hit: bool  # read from disk (True) or computed now (False)


class FeatureCache:
    """One cache directory: ``load`` / ``save`` entries by fingerprint, list and prune them."""

    def __init__(self, directory: Optional[Union[str, Path]] = None):
        self.dir = Path(directory).expanduser() if directory else default_cache_dir()

    def _paths(self, key: str, views: int) -> tuple[Path, Path]:
        stem = f"{key}-v{views}"
        return self.dir / f"{stem}.safetensors", self.dir / f"{stem}.json"

    def load(self, components: dict, views: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``views`` views from the smallest complete entry holding at least that many,
        or None. An entry whose manifest disagrees with ``components`` or its file is ignored."""
        key = key_of(components)
        candidates = []
        for manifest in self.dir.glob(f"{key}-v*.json"):
            meta = _read_json(manifest)
            if meta is None or meta.get("components") != components or meta.get("views", 0) < views:
                continue
            data = manifest.with_suffix(".safetensors")
            if not data.is_file() or data.stat().st_size != meta.get("bytes"):
                continue
            candidates.append((meta["views"], data))
        for _, data in sorted(candidates, key=lambda c: c[0]):
            try:
                tensors = load_file(str(data))
            except Exception as err:  # a damaged file is recomputed, never trusted
                log.warning("feature cache: cannot read %s (%s); recomputing", data, err)
                continue
            feats, labels = tensors["features"], tensors["labels"]
            if feats.shape[0] >= views and feats.shape[1] == components["items"]["count"] == len(labels):
                return feats[:views].contiguous(), labels
        return None

    def save(self, components: dict, features: torch.Tensor, labels: torch.Tensor) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        key, views = key_of(components), int(features.shape[0])
        data, manifest = self._paths(key, views)
        _atomic_write(data, lambda p: save_file({"features": features.contiguous(),
                                                 "labels": labels.contiguous()}, str(p)))
        meta = {"key": key, "views": views, "shape": list(features.shape), "dtype": str(features.dtype),
                "bytes": data.stat().st_size, "created": time.time(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "components": components}
        _atomic_write(manifest, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
        return data

    @contextlib.contextmanager
    def lock(self, components: dict) -> Iterator[None]:
        """An exclusive per-key lock (so that concurrent runs compute an entry once)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, writes stay atomic
            yield
            return
        with open(self.dir / f"{key_of(components)}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        """Every complete entry's manifest (plus its ``path``), newest first."""
        out = []
        for manifest in self.dir.glob("*.json"):
            meta = _read_json(manifest)
            if meta is not None and "components" in meta:
                meta["path"] = str(manifest.with_suffix(".safetensors"))
                out.append(meta)
        return sorted(out, key=lambda m: float(m.get("created", 0)), reverse=True)

    def stale_entries(self) -> list[dict]:
        """Entries that can no longer be hit: their files changed or vanished (the item digest
        moved on), their data file is missing or the wrong size, or a newer entry exists for the
        same (backbone name + tag, dataset, root, split) under another fingerprint."""
        stale, newest = [], {}
        for meta in self.entries():  # newest first
            c = meta["components"]
            slot = json.dumps([c["backbone"]["name"], c["backbone"]["pretrained"], c["dataset"],
                               c["transform"], c["normalize"]], sort_keys=True)
            data = Path(meta["path"])
            broken = not data.is_file() or data.stat().st_size != meta.get("bytes")
            superseded = slot in newest and newest[slot] != meta["key"]
            newest.setdefault(slot, meta["key"])
            if broken or superseded:
                stale.append(meta)
        return stale

    def prune(self) -> int:
        """Delete the stale entries; returns how many."""
        stale = self.stale_entries()
        for meta in stale:
            data = Path(meta["path"])
            for path in (data, data.with_suffix(".json")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return len(stale)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------ encoding ------
def encode_items(backbone, items: Sequence[Item], root: Union[str, Path], transform, *,
                 views: int = 1, dataset: str = "", split: str = "", normalize: bool = True,
                 seed: int = DEFAULT_VIEW_SEED, cache: bool = True,
                 cache_dir: Optional[Union[str, Path]] = None, batch_size: int = 128,
                 num_workers: int = 0, device: Optional[Union[str, torch.device]] = None,
                 dense: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> CachedFeatures:
    """Frozen image features of ``views`` views of every item, [views, n, d], from the cache when
    an entry exists, else computed (on ``device``, default: the backbone's) and stored.
    ``dense`` names dense outputs to keep instead, packed per image as [T, d]
    (``adapt/dense.py:pack_dense``); ``dtype`` is the storage type (float16 halves the memory).

    ``views=1`` with a deterministic transform is the evaluation case; with a random transform,
    view ``v`` is the same augmentation however many views are asked for."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    components = fingerprint(backbone, items, root, transform, dataset=dataset, split=split,
                             normalize=normalize, seed=seed, dense=dense, dtype=dtype)
    key = key_of(components)
    store = FeatureCache(cache_dir) if cache else None
    if store is not None:
        found = store.load(components, views)
        if found is not None:
            return CachedFeatures(found[0], found[1], key, hit=True)
    with store.lock(components) if store is not None else contextlib.nullcontext():
        if store is not None:  # another process may have written it while we waited
            found = store.load(components, views)
            if found is not None:
                return CachedFeatures(found[0], found[1], key, hit=True)
        start = time.perf_counter()
        feats, labels = _compute(backbone, items, root, transform, views, normalize, seed,
                                 batch_size, num_workers, device, tuple(dense), dtype)
        log.info("feature cache: encoded %d image(s) x %d view(s) of %s/%s in %.1fs",
                 len(items), views, dataset, split, time.perf_counter() - start)
        if store is not None:
            store.save(components, feats, labels)
    return CachedFeatures(feats, labels, key, hit=False)


def _compute(backbone, items, root, transform, views, normalize, seed, batch_size, num_workers,
             device, dense=(), dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(device) if device is not None else backbone.logit_scale.device
    if device != backbone.logit_scale.device:
        backbone.to(device)
    loader = DataLoader(ViewDataset(items, root, transform, range(views), seed), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    feats = None
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    with torch.no_grad():
        for images, _, view, index in loader:
            images = images.to(device, non_blocking=True)
            if dense:
                from adapt.dense import pack_dense
                out = pack_dense(backbone.encode_image_dense(images, outputs=dense, normalize=normalize), dense)
            else:
                out = backbone.encode_image(images, normalize=normalize)
            if feats is None:  # dense shapes are known once the first batch is encoded
                feats = torch.empty(views, len(items), *out.shape[1:], dtype=dtype)
            feats[view, index] = out.to(dtype).cpu()
    if feats is None:
        feats = torch.empty(views, 0, backbone.embed_dim, dtype=dtype)
    return feats, labels


# ------------------------------------------------------------------------------ loaders -------
class CachedViewsDataset(Dataset):
    """Index ``(i, v)`` -> (feature of view ``v`` of item ``i``, label)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, key):
        i, v = key
        return self.features[v, i].float(), self.labels[i]  # stored in float16 or float32


class CachedEvalDataset(Dataset):
    """Index ``i`` -> (feature of item ``i``'s one view, as float32, label)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i):
        return self.features[i].float(), self.labels[i]


class EpochViewSampler(Sampler):
    """Yields ``(item, view)``: a fresh order each epoch (if ``shuffle``), and for every item a
    different one of its ``n_views`` views, each view used once per ``n_views`` epochs in a
    random order. Lightning calls ``set_epoch`` before every epoch; without it the epoch advances
    on every pass."""

    def __init__(self, n_items: int, n_views: int, shuffle: bool = True, seed: int = 0):
        self.n, self.n_views, self.shuffle, self.seed = n_items, n_views, shuffle, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def views_of(self, epoch: int) -> torch.Tensor:
        cycle, turn = divmod(epoch, self.n_views)
        g = torch.Generator().manual_seed(view_seed(self.seed, cycle, "views"))
        return torch.rand(self.n, self.n_views, generator=g).argsort(dim=1)[:, turn]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        views = self.views_of(epoch)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                view_seed(self.seed, epoch, "order")))
        else:
            order = torch.arange(self.n)
        return iter([(int(i), int(views[i])) for i in order])
