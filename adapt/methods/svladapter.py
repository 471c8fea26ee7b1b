"""SVL-Adapter (Pantazis, Brostow, Jones & Mac Aodha, BMVC 2022; omipan/svl_adapter@9e8eca3,
low_shot_adapt.py, zero_shot_pseudo_adapt.py, models.AdapterMLP, utils.adapter_train): a second,
self-supervised image encoder pretrained on the target's unlabelled images, an MLP adapter on its
features, and the adapter's logits fused with zero-shot CLIP's.

    s = h(x)          SimCLR encoder h (adapt/methods/simclr.py), pretrained on the target's images
    A(s) = W₂ ReLU(W₁ s + b₁) + b₂                  d → 256 → C, trained with CE on the labels
    logits = λ·A(s) + (1 − λ)·100·cos(f(x), w_c)    w_c: the dataset's first (hand) template

λ (``fusion``): ``validation`` (SVL-Adapter, ``--tune_alpha``): the grid {0, 0.05, …, 1} on the
validation split after training, ties to the smallest λ; ``confidence`` (SVL-Adapter*,
``--confidence_alpha``): λ = 1 − mean over the **test** images of max_c softmax(100·cos(f, w_c)).
That rule is TRANSDUCTIVE: it reads the whole test set's zero-shot confidence (no labels) before
predicting any of it. A number in [0, 1] fixes λ (the original's ``--adapter_alpha``, 0.2).
Without labels (SVL-Adapter*'s zero-shot variant) run it with ``data.setting=unsupervised`` and
``data.shots: 16``: the zero-shot model's 16 most confident images per predicted class are the
adapter's labels (UPL's selection, adapt/settings/unsupervised.py), fused with ``confidence``.

The SimCLR pool: ``data.unlabelled.folder`` when given, else the dataset's training and validation
splits with their labels dropped (the original's ``['train', 'val']``), whatever the few-shot
sample. The encoder is cached (adapt/methods/simclr.py) and saved in the adapter (its weights are
part of what predicts). Defaults are the original's: adapter hidden 256, Adam lr 1e-3 (torch's
default, the recipes), 50 epochs, batch 32, features extracted from 224 × 224 images; SimCLR's
in simclr.py.

Departures:
- The SimCLR encoder starts from random weights unless ``ssl_weights`` names a local file (the
  original downloads ImageNet-supervised ones); simclr.py lists its own departures.
- The SSL features are read from the image CLIP sees (the data's test transform: resize + centre
  crop), un-normalised and resized to ``ssl_feature_size`` (bilinear, antialiased) with ImageNet's
  mean / std; the original squashes the file to 224 × 224 (``Resize((224, 224))``). The adapter
  trains on those features, unaugmented, as the original's precomputed ones (``train_transform``
  is the test transform).
- ``confidence`` reads the normalized CLIP features, the same logits the fusion uses; for RN50 the
  original computes it on un-normalised ones (only its ViT-L/14 branch normalises), which is a bug
  there. Over several evaluation sets it pools them.
- The validation grid reads the data module's validation split (few-shot: min(K, 4) per class as
  CoOp's sampling; the original draws {1, 2, 4, 4, 4} per class for K = 1, 2, 4, 8, 16).
- The zero-shot variant's rule for a class the zero-shot model never predicts (the original gives it
  its single highest-probability image from the other classes) is not reproduced: UPL's selection
  leaves it with none.
- The original trains the MLP without a torch seed; the run's seed sets it here. The CLIP features
  are the run's backbone's (the original's RN50 in fp16).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.data.feature_cache import default_cache_dir
from adapt.data.items import Item
from adapt.data.folder import unlabelled_folder_paths
from adapt.data.transforms import test_transform
from adapt.methods.base import HandWrittenClassifier, MethodOutput, items_of_classes
from adapt.methods.registry import register_method
from adapt.methods.simclr import IMAGENET_MEAN, IMAGENET_STD, SimCLRConfig, SimCLRModel, pretrained_encoder

log = logging.getLogger(__name__)

FUSIONS = ("validation", "confidence")


def parse_fusion(value) -> tuple[str, Optional[float]]:
    """``validation`` / ``confidence`` / a weight in [0, 1] -> (policy, weight or None)."""
    text = str(value).strip().lower()
    if text in FUSIONS:
        return text, None
    try:
        weight = float(text)
    except ValueError:
        weight = None
    if weight is None or not 0.0 <= weight <= 1.0:
        raise ValueError(f"method.fusion={value!r}: give validation (λ chosen on the validation split), "
                         "confidence (λ = 1 - the mean zero-shot confidence on the test images: transductive) "
                         "or a fixed weight λ in [0, 1] (the original's --adapter_alpha: 0.2)")
    return "fixed", weight


@dataclass
class SVLAdapterConfig:
    fusion: str = "validation"  # validation | confidence (transductive) | a weight in [0, 1]
    hidden: int = 256  # the adapter's hidden width (--hidden_size)
    grid_steps: int = 20  # the validation grid {0, 1/n, ..., 1} (the original's 21 values)
    # the zero-shot logits' multiplier: the original's hard-coded 100; null = the backbone's own
    # scale (and bias), so that at λ = 0 the logits are exactly the zero-shot method's
    clip_logit_scale: Optional[float] = 100.0
    # the features' resolution (the original extracts at 224); null = the CLIP input's
    ssl_feature_size: Optional[int] = 224
    # SimCLR (adapt/methods/simclr.py; the original's ssl_pretraining.py defaults)
    ssl_arch: str = "resnet50"
    ssl_weights: Optional[str] = None
    ssl_epochs: int = 200
    ssl_batch_size: int = 256
    ssl_lr_mult: float = 0.03
    ssl_momentum: float = 0.9
    ssl_weight_decay: float = 5e-4
    ssl_temperature: float = 0.5
    ssl_projection_dim: int = 128
    ssl_image_size: int = 112
    ssl_crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ssl_color_strength: float = 0.5
    ssl_seed: int = 2001

    def __post_init__(self) -> None:
        parse_fusion(self.fusion)
        if self.hidden < 1 or self.grid_steps < 1:
            raise ValueError(f"hidden and grid_steps must be >= 1, got {self.hidden}, {self.grid_steps}")
        if self.clip_logit_scale is not None and self.clip_logit_scale <= 0:
            raise ValueError(f"clip_logit_scale must be > 0 (or null for the model's), got {self.clip_logit_scale}")
        if self.ssl_feature_size is not None and self.ssl_feature_size < 8:
            raise ValueError(f"ssl_feature_size must be >= 8 (or null), got {self.ssl_feature_size}")
        self.ssl().check("method.ssl_")

    def ssl(self) -> SimCLRConfig:
        return SimCLRConfig(arch=self.ssl_arch, weights=self.ssl_weights, epochs=self.ssl_epochs,
                            batch_size=self.ssl_batch_size, lr_mult=self.ssl_lr_mult, momentum=self.ssl_momentum,
                            weight_decay=self.ssl_weight_decay, temperature=self.ssl_temperature,
                            projection_dim=self.ssl_projection_dim, image_size=self.ssl_image_size,
                            crop_scale=list(self.ssl_crop_scale), color_strength=self.ssl_color_strength,
                            seed=self.ssl_seed)


def confidence_weight(zero_shot_logits: torch.Tensor) -> float:
    """SVL-Adapter*'s λ: 1 − the mean over images of the zero-shot model's top softmax probability."""
    return 1.0 - float(zero_shot_logits.float().softmax(dim=-1).max(dim=-1).values.mean())


def fuse(adapter_logits: torch.Tensor, zero_shot_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """λ·A(s) + (1 − λ)·zero-shot; the ends exactly (λ = 0 is zero-shot CLIP, bit for bit)."""
    if weight == 0:
        return zero_shot_logits
    if weight == 1:
        return adapter_logits.to(zero_shot_logits.dtype)
    return weight * adapter_logits.to(zero_shot_logits.dtype) + (1 - weight) * zero_shot_logits


@register_method("svladapter")
class SVLAdapter(HandWrittenClassifier):
    """SVL-Adapter: an MLP on a SimCLR encoder's features, fused with zero-shot CLIP by a weight λ.

    ``fusion=confidence`` (SVL-Adapter*) is transductive: λ reads the test set's zero-shot confidence."""

    Config = SVLAdapterConfig
    trainable_kind = "MLP on SimCLR features (confidence λ: transductive)"
    supports_feature_cache = False  # the second encoder reads the images
    repointable = False  # one adapter output per training class

    def __init__(self, config: SVLAdapterConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.policy, weight = parse_fusion(config.fusion)
        device = backbone.logit_scale.device
        ssl = SimCLRModel(config.ssl())
        self.ssl_encoder = ssl.encoder.to(device).requires_grad_(False).eval()
        self.head = nn.Sequential(nn.Linear(ssl.feature_dim, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, len(self.classnames))).to(device)
        # λ: saved with the adapter; 0.5 until validation or the test set's confidence sets it
        self.register_buffer("alpha", torch.tensor(0.5 if weight is None else weight, device=device))
        for name, values in (("pixel_mean", backbone.image_mean), ("pixel_std", backbone.image_std),
                             ("ssl_mean", IMAGENET_MEAN), ("ssl_std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(values, device=device).view(1, 3, 1, 1), persistent=False)
        self.ssl_report: dict = {}
        self.fusion_report: dict = {}
        self._val_loader = None
        self.rebuild_classes()

    # ------------------------------------------------------------------ setup ------------------
    def ssl_pool(self, dm) -> list[Item]:
        """The SimCLR stage's images: ``data.unlabelled.folder``'s, else the dataset's train and
        val splits (labels dropped)."""
        folder = dm.cfg.unlabelled.folder if dm.cfg.unlabelled is not None else None
        if folder:
            return [Item(p, -1) for p in unlabelled_folder_paths(folder)]
        return [Item(it.path, -1) for it in list(dm.dataset.train) + list(dm.dataset.val)]

    def setup(self, datamodule) -> None:
        """Pretrain (or load) the SimCLR encoder on the unlabelled pool; keep the validation
        images for λ, or compute the confidence λ on the test images."""
        dm = datamodule
        pool = self.ssl_pool(dm)
        if len(pool) < 2:
            raise ValueError(f"svladapter pretrains its SimCLR encoder on the target's unlabelled images, but the "
                             f"data gives {len(pool)}: give data.unlabelled.folder (with "
                             "data.setting=unsupervised) or a dataset whose train split has images")
        cache = None
        if dm.use_feature_cache:
            cache = (Path(dm.cfg.cache_dir).expanduser() if dm.cfg.cache_dir else default_cache_dir()) / "simclr"
        model, report = pretrained_encoder(self.config.ssl(), pool, dm.dataset.root, self.alpha.device, cache,
                                           dataset=dm.dataset.name, num_workers=dm.cfg.num_workers)
        self.ssl_encoder.load_state_dict(model.encoder.state_dict())
        self.ssl_encoder.eval()
        self.ssl_report = report
        val = items_of_classes(dm.val_items, dm.train_classnames, self.classnames)
        self._val_loader = (lambda: dm.dataloader(val, dm.test_transform(), dm.cfg.eval_batch_size)) if val else None
        if self.policy == "validation" and self._val_loader is None:
            raise ValueError("svladapter with method.fusion=validation chooses λ on validation images, but the data "
                             "has none (data.setting=unsupervised has no labelled validation split); use "
                             "method.fusion=confidence (transductive) or a fixed weight, e.g. method.fusion=0.2")
        if self.policy == "confidence":
            items = [it for _, its in dm.eval_sets.values() for it in its]
            parts = [dm.encode(self.backbone, its, dm.test_transform(), f"test:{name}", normalize=False,
                               device=self.alpha.device).features[0]
                     for name, (_, its) in dm.eval_sets.items() if its]
            if not parts:
                raise ValueError("svladapter with method.fusion=confidence reads the test images' zero-shot "
                                 "confidence, but the data has no evaluation images")
            feats = F.normalize(torch.cat(parts).to(self.alpha.device, torch.float32), dim=-1)
            with torch.no_grad():
                weight = confidence_weight(self.zero_shot_logits(feats))
                self.alpha.fill_(weight)
            self.fusion_report = {"policy": "confidence (transductive: the test images' zero-shot confidence)",
                                  "test_images": len(items)}
            log.info("svladapter: λ = %.4f = 1 - mean zero-shot confidence on %d test images (transductive)",
                     weight, len(items))

    def train_transform(self, image_size: int, mean, std):
        """The original trains the adapter on features of unaugmented images."""
        return test_transform(image_size, mean, std)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ssl_encoder.eval()  # frozen: its BatchNorm statistics stay the pretrained ones
        return self

    # ------------------------------------------------------------------ forward ----------------
    def ssl_features(self, images: torch.Tensor) -> torch.Tensor:
        """h(x) of images normalized for CLIP: back to pixels, resized, ImageNet-normalized."""
        pixels = images.float() * self.pixel_std + self.pixel_mean
        size = self.config.ssl_feature_size
        if size is not None and tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            return self.ssl_encoder((pixels - self.ssl_mean) / self.ssl_std)

    def adapter_logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.ssl_features(images)
        return self.head(feats.to(self.head[0].weight.dtype))

    def zero_shot_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        scale = self.config.clip_logit_scale
        if scale is None:
            return self.backbone.logits(image_features, self.text_features)
        return scale * image_features @ self.text_features.to(image_features.dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("svladapter reads images (its SimCLR encoder needs pixels), not cached features")
        zs = self.zero_shot_logits(self.image_features_of(x))
        weight = float(self.alpha)
        return zs if weight == 0 else fuse(self.adapter_logits(x), zs, weight)

    def output(self, x: torch.Tensor):
        """Training trains the adapter alone on its own logits (CE), as the original."""
        return MethodOutput(self.adapter_logits(x))

    # ------------------------------------------------------------------ λ ----------------------
    def set_alpha(self, value: float) -> None:
        with torch.no_grad():
            self.alpha.fill_(float(value))

    def grid(self) -> list[float]:
        n = self.config.grid_steps
        return [i / n for i in range(n + 1)]

    def choose_alpha(self, loader) -> float:
        """The smallest λ of the grid with the best validation accuracy (the original's strict >)."""
        was_training = self.training
        self.eval()
        device = self.alpha.device
        adapter, zs, labels = [], [], []
        with torch.no_grad():
            for x, y in loader:
                x = x.to(device)
                adapter.append(self.adapter_logits(x).float())
                zs.append(self.zero_shot_logits(self.image_features_of(x)).float())
                labels.append(y.to(device))
        a, z, y = torch.cat(adapter), torch.cat(zs), torch.cat(labels)
        accs = {w: 100.0 * float((fuse(a, z, w).argmax(-1) == y).float().mean()) for w in self.grid()}
        best = max(accs.values())
        alpha = min(w for w, acc in accs.items() if acc == best)
        self.fusion_report = {"policy": "validation", "val_acc": best, "val_images": len(y),
                              "val_acc_zero_shot": accs[0.0], "val_acc_adapter": accs[1.0]}
        self.train(was_training)
        return alpha

    def on_fit_end(self) -> None:
        if self.policy == "validation" and self._val_loader is not None:
            self.set_alpha(self.choose_alpha(self._val_loader()))
            log.info("svladapter: λ = %g chosen on %d validation images (acc %.2f%%)", float(self.alpha),
                     self.fusion_report["val_images"], self.fusion_report["val_acc"])

    def evaluation_sweep(self):
        """results.json reports the test metrics at λ = 0, 0.1, ..., 1 beside the chosen one (each
        value is one pass over the test images through both encoders)."""
        return "alpha", [i / 10 for i in range(11)], self.set_alpha, float(self.alpha)

    def scalars(self) -> dict[str, float]:
        out = {"alpha": float(self.alpha)}
        losses = self.ssl_report.get("losses") or []
        if losses:
            out.update(ssl_loss_first=float(losses[0]), ssl_loss_last=float(losses[-1]))
        if "cache" in self.ssl_report:
            out["ssl_cached"] = float(self.ssl_report["cache"] == "hit")
        for key in ("val_acc", "val_acc_zero_shot", "val_acc_adapter"):
            if key in self.fusion_report:
                out[key] = float(self.fusion_report[key])
        return out

    # ------------------------------------------------------------------ state ------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter, λ, and the SimCLR encoder's weights (they are part of what predicts)."""
        state = super().trainable_state()
        state.update({"ssl_encoder." + k: v.detach() for k, v in self.ssl_encoder.state_dict().items()})
        return state
