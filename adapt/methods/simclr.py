"""SimCLR pretraining of a small image encoder on a target's unlabelled images: the second
encoder of SVL-Adapter (adapt/methods/svladapter.py), kept apart so that any method can use it.

As omipan/svl_adapter@9e8eca3 (ssl_pretraining.py, models.EmbModel, utils.nt_xent,
datasets.im_transforms / get_color_distortion):

- encoder h: a torchvision ResNet without its ``fc`` (resnet18 / resnet34 / resnet50), and a
  projector g = Linear(d, 512)-ReLU-Linear(512, 128) used only by the loss;
- two views of each image: RandomResizedCrop(112, scale 0.2-1), horizontal flip, ColorJitter
  (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2, ImageNet mean / std;
- NT-Xent: z = normalize(g(h(v))) of both views stacked, S = z zᵀ / τ (τ = 0.5) with the
  diagonal lowered by 1e5, cross-entropy of each row towards the other view of its image;
- SGD lr 0.03·batch/256, momentum 0.9, wd 5e-4, cosine over every step of 200 epochs, batch 256,
  seed 2001.

Departures:
- The original starts from ImageNet-supervised weights (torchvision ``pretrained=True``). Nothing
  can be downloaded here, so the default is random init; ``weights`` names a local state-dict file
  (torchvision's ``resnet50-*.pth``; its ``fc.*`` entries are dropped) to start as the original.
- ``resnet_small``: a 3x3 stride-2 stem, one BasicBlock per stage, widths 16-32-64-128 (128-d features), the offline
  world's encoder, which trains in seconds on a CPU. Not in the original.
- A last batch of one image is skipped (the original's ``nt_xent`` gives it a degenerate target).
- The initial weights and the augmentations are drawn with torch seeded by ``seed`` inside
  ``torch.random.fork_rng``, so the run's own random stream is untouched and a rerun gives the same
  encoder.

Cache: the trained encoder is stored under ``<cache>/simclr/<key>.pt`` (+ ``.json``), the key a hash
of the config, the image list (paths, sizes, modification times: ``items_digest``), the start
weights' digest and the package versions, written atomically (adapt/io.py) under a per-key lock, so
a second run with the same data and config loads it and does not train. A run killed during
pretraining writes nothing (at most a ``.tmp`` file that is never read); the next run pretrains
from the start and, seeded, gets the same encoder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock

from adapt.data.feature_cache import FeatureCache, items_digest, key_of
from adapt.data.image_dataset import ImageDataset
from adapt.data.items import Item
from adapt.data.transforms import ToRGB
from adapt.io import atomic_save, atomic_write_json

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet_small")
# how many encoders were trained in this process (tests check that a cached one is not retrained)
PRETRAIN_RUNS = {"count": 0}


@dataclass
class SimCLRConfig:
    arch: str = "resnet50"  # the README's command (argparse default: resnet18)
    weights: Optional[str] = None  # local start weights (ImageNet-supervised in the original); null = random
    epochs: int = 200
    batch_size: int = 256
    lr_mult: float = 0.03  # lr = lr_mult * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.5
    projection_dim: int = 128
    projector_hidden: int = 512
    image_size: int = 112  # --im_res of the SSL stage
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    color_strength: float = 0.5  # get_color_distortion(s): jitter 0.8s, 0.8s, 0.8s, 0.2s
    seed: int = 2001

    def check(self, prefix: str = "") -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"{prefix}arch={self.arch!r} is not a known encoder; use one of {', '.join(ARCHS)}")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise ValueError(f"{prefix}weights={self.weights}: no such file; give a local torchvision "
                             "state-dict file (e.g. resnet50-0676ba61.pth) or null for random init")
        if self.epochs < 0 or self.batch_size < 2 or self.image_size < 8:
            raise ValueError(f"{prefix}epochs must be >= 0, batch_size >= 2 (NT-Xent needs two images), "
                             f"image_size >= 8; got {self.epochs}, {self.batch_size}, {self.image_size}")
        if self.temperature <= 0 or self.lr_mult <= 0:
            raise ValueError(f"{prefix}temperature and lr_mult must be > 0, got {self.temperature}, {self.lr_mult}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"{prefix}crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.crop_scale)}")

    @property
    def lr(self) -> float:
        return self.lr_mult * self.batch_size / 256


# ------------------------------------------------------------------------------ loss ----------
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of two views [B, k] each (B >= 2): (2B-1)-way cross-entropy of every embedding
    towards its image's other view, cosine similarities over ``temperature``."""
    if z1.shape[0] < 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs two views of B >= 2 images each, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    scores = z @ z.t() / temperature
    n = z1.shape[0]
    scores = scores - 1e5 * torch.eye(2 * n, device=z.device, dtype=scores.dtype)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(scores, targets)


# ------------------------------------------------------------------------------ views ---------
class TwoViews:
    """Two independent draws of ``transform`` of one image, stacked [2, 3, H, W]."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return torch.stack([self.transform(image), self.transform(image)])

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def simclr_transform(cfg: SimCLRConfig) -> T.Compose:
    s = cfg.color_strength
    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale)),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ------------------------------------------------------------------------------ encoder -------
def small_resnet(widths: Sequence[int] = (16, 32, 64, 128)) -> nn.Sequential:
    """A 3x3 stride-2 stem, one torchvision BasicBlock per stage (stride 2 from the second),
    global average pool."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(inplace=True)]
    inplanes = widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != w:
            down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
        layers.append(BasicBlock(inplanes, w, stride, down))
        inplanes = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def build_encoder(cfg: SimCLRConfig) -> tuple[nn.Module, int]:
    """The encoder h (its pooled feature, ``fc`` removed) and its feature size."""
    if cfg.arch == "resnet_small":
        return small_resnet(), 128
    net = getattr(resnet, cfg.arch)(weights=None)
    if cfg.weights is not None:
        state = torch.load(Path(cfg.weights).expanduser(), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, _ = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing:
            raise ValueError(f"simclr weights {cfg.weights} do not fit torchvision {cfg.arch}: "
                             f"missing {missing[:4]}")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class SimCLRModel(nn.Module):
    def __init__(self, cfg: SimCLRConfig):
        super().__init__()
        self.encoder, self.feature_dim = build_encoder(cfg)
        self.projector = nn.Sequential(nn.Linear(self.feature_dim, cfg.projector_hidden), nn.ReLU(),
                                       nn.Linear(cfg.projector_hidden, cfg.projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


# ------------------------------------------------------------------------------ training ------
@contextlib.contextmanager
def seeded(seed: int, device="cpu") -> Iterator[None]:
    """Torch's random state at ``seed`` inside, the caller's restored after."""
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def pretrain(model: SimCLRModel, items: Sequence[Item], root, cfg: SimCLRConfig, device,
             num_workers: int = 0, read=None) -> list[float]:
    """SimCLR on ``items`` (labels unused); returns each epoch's mean loss. Seeded by ``cfg.seed``
    without touching the caller's random state."""
    PRETRAIN_RUNS["count"] += 1
    losses: list[float] = []
    with seeded(cfg.seed, device):
        loader = DataLoader(ImageDataset(items, root, TwoViews(simclr_transform(cfg)), read=read),
                            batch_size=min(cfg.batch_size, len(items)), shuffle=True, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        model.to(device).train()
        opt = torch.optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs * len(loader)))
        for epoch in range(cfg.epochs):
            total, seen = 0.0, 0
            for views, _ in loader:
                if views.shape[0] < 2:  # a lone last image: no negatives
                    continue
                v = views.to(device)
                z = model(torch.cat([v[:, 0], v[:, 1]]))
                loss = nt_xent(z[: len(v)], z[len(v):], cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, seen = total + float(loss.detach()) * len(v), seen + len(v)
            losses.append(total / max(1, seen))
            log.info("simclr epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    model.eval()
    return losses


def file_digest(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_components(cfg: SimCLRConfig, items: Sequence[Item], root, dataset: str = "") -> dict:
    """Everything that determines the pretrained encoder."""
    import torchvision

    from adapt.version import __version__

    return {"simclr": {k: v for k, v in asdict(cfg).items() if k != "weights"},
            "weights": file_digest(cfg.weights), "dataset": dataset,
            "root": str(Path(root).expanduser().resolve()),
            "items": {"count": len(items), "digest": items_digest(items, root)},
            "versions": {"adapt": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}}


def pretrained_encoder(cfg: SimCLRConfig, items: Sequence[Item], root, device, cache_dir: Optional[Path],
                       dataset: str = "", num_workers: int = 0, read=None) -> tuple[SimCLRModel, dict]:
    """The SimCLR model pretrained on ``items``: from ``cache_dir`` when an entry for this data
    and config exists, else trained now (and stored there; ``cache_dir`` None: not stored).
    Returns the model (eval mode, on ``device``) and a report (cache hit, losses, path)."""
    with seeded(cfg.seed):  # the same start for the same config, whatever the run's seed
        model = SimCLRModel(cfg)
    if cache_dir is None:
        losses = pretrain(model, items, root, cfg, device, num_workers, read)
        return model, {"cache": "off", "losses": losses, "images": len(items)}
    components = cache_components(cfg, items, root, dataset)
    key = key_of(components)
    path, meta_path = Path(cache_dir) / f"{key}.pt", Path(cache_dir) / f"{key}.json"
    cache = FeatureCache(cache_dir)
    with cache.lock(components):
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and meta.get("components") == components and path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.to(device).eval(), {"cache": "hit", "path": str(path), "losses": meta["losses"],
                                             "images": len(items)}
        losses = pretrain(model, items, root, cfg, device, num_workers, read)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_save(path, lambda p: torch.save(state, p))
        atomic_write_json(meta_path, {"key": key, "components": components, "losses": losses})  # last
    return model.eval(), {"cache": "trained", "path": str(path), "losses": losses, "images": len(items)}
