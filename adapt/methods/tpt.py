"""TPT (Shu et al., NeurIPS 2022): test-time prompt tuning, one image at a time, no labels.

Per test image: 64 views (the image itself + 63 random resized crops with flips, see
``adapt.methods.views``), logits of every view under a CoOp context initialised from "a photo
of a", keep the 10% most confident views (lowest entropy), take one AdamW step on the entropy of
their averaged prediction, then predict the original view. The context and the optimizer start
afresh for every image (episodic).

``init_from`` starts every image from an exported adapter instead (an ``adapter/`` folder or the
run directory holding it), re-pointed at the evaluation classes, as TPT's paper does with CoOp and
CoCoOp and later work with MaPLe:
- CoOp (and any method whose prediction is its ``ContextPrompts`` on frozen image features):
  the learned context is tuned;
- CoCoOp: as TPT's ``--cocoop`` path, the context generated from the original view (learned
  context + meta-net bias) is tuned, the meta-net stays fixed;
- other adapters (MaPLe): all their learned prompts are tuned through their own forward on the
  views (re-encoded with the prompts at every step); TPT's code has no MaPLe path.
Every tuned tensor is restored to the adapter's values after each image.

TPT's code crops the raw image (RandomResizedCrop(224), bilinear) for the ImageNet sets and adds
AugMix for the fine-grained ones (``augmix: true``, recipes/tpt/finegrained.yaml); here the crops
are made from the normalized test tensor (``adapt.methods.views``). Under fp16 autocast the
original scales the loss (GradScaler); here no scaler is used (bf16 needs none).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from adapt.methods.adapters import WEIGHTS_FILE, load_adapter
from adapt.methods.base import Method, is_features
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method
from adapt.methods.views import (ViewConfig, averaged_entropy, confident, crop_boxes, entropy,  # noqa: F401
                                 resized_crops, test_views, with_view_seed)


@dataclass
class TPTConfig(ViewConfig):
    ctx_init: str = "a photo of a"
    # fraction of views kept by confidence (lowest entropy); int(n_views · p), at least 1
    selection_p: float = 0.1
    # test-time steps; the selection is made on the first and kept (as TPT)
    steps: int = 1
    # AdamW as TPT builds it: torch defaults but lr (weight decay 0.01, betas 0.9/0.999)
    lr: float = 5e-3
    weight_decay: float = 0.01
    # an exported CoOp / CoCoOp / MaPLe adapter, or a run directory with one, to start from;
    # null = the hand-written ctx_init
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ctx_init.strip():
            raise ValueError("ctx_init must be a prompt such as 'a photo of a' (its words set the context)")
        if not 0 < self.selection_p <= 1:
            raise ValueError(f"selection_p must be in (0, 1], got {self.selection_p}")
        if self.steps < 0 or self.lr < 0 or self.weight_decay < 0:
            raise ValueError("steps, lr and weight_decay must be >= 0")


def load_source(path: str, backbone, classnames) -> Method:
    """The adapter at ``path`` (an adapter folder or a run directory), for ``classnames``."""
    root = Path(path).expanduser()
    adapter = root / "adapter" if (root / "adapter" / WEIGHTS_FILE).is_file() else root
    if not (adapter / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"method.init_from={path}: no {WEIGHTS_FILE} there or in {root / 'adapter'}; give the "
            "run directory of a finished CoOp / CoCoOp / MaPLe fit, or the folder `adapt export` wrote")
    source = load_adapter(adapter, backbone=backbone, classnames=classnames)
    if source.test_time or not source.trainable_state():
        raise ValueError(f"method.init_from={path} is a {source.name} adapter, which has no learned "
                         "prompt to tune; use a CoOp, CoCoOp or MaPLe adapter")
    return source


@register_method("tpt")
class TPT(Method):
    Config = TPTConfig
    trainable_kind = "text context, per test image"
    grad_at_test = True  # the engine evaluates with inference mode off
    test_time = "episodic"

    def __init__(self, config: TPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.source: Optional[Method] = None
        if config.init_from:
            self.source = load_source(config.init_from, backbone, self.classnames)
            self.tuned_names = [n for n, p in self.source.named_parameters() if p.requires_grad]
            # nothing trains before test (is_trainable is False); each image tunes and restores
            self.source.requires_grad_(False)
            self.initial = {n: p.detach().clone() for n, p in self.source.named_parameters()
                            if n in self.tuned_names}
        prompts = getattr(self.source, "prompts", None)
        # a context path: the source predicts with its ContextPrompts on frozen image features
        self.context_path = self.source is None or (isinstance(prompts, ContextPrompts)
                                                    and self.source.supports_feature_cache)
        if self.source is None:
            self.prompts = ContextPrompts(backbone, 0, config.ctx_init, position="end")
            self.prompts.ctx.requires_grad_(False)
        elif self.context_path:
            self.prompts = prompts
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        if self.source is not None:
            self.source.set_classnames(self.classnames)
        else:
            self.prompts.build(self.classnames)

    def setup(self, datamodule) -> None:
        self.config = with_view_seed(self.config, datamodule)

    def reset_test_state(self) -> None:
        """The adapter's own values back on every tuned tensor (the default context is a copy)."""
        if self.source is not None:
            params = dict(self.source.named_parameters())
            with torch.no_grad():
                for name, value in self.initial.items():
                    params[name].copy_(value)
            self.source._text_cache = None

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """The untuned model (the initial context, or the adapter as exported)."""
        if self.source is not None:
            return self.source.forward_features(image_features)
        return self.backbone.logits(image_features, self.cached_text_features(self.prompts.text_features))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if is_features(x):
            raise ValueError("tpt augments each test image, so it needs images, not cached features")
        return torch.cat([self.predict_one(image) for image in x])

    def views(self, image: torch.Tensor) -> torch.Tensor:
        """[n_views, C, H, W]: the image itself first, then the random crops."""
        return test_views(image, self.config, self.backbone.image_mean, self.backbone.image_std)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices of the most confident views (lowest entropy; TPT's argsort order)."""
        return confident(logits, self.config.selection_p)

    def initial_context(self, feats: torch.Tensor) -> torch.Tensor:
        """The context this image's tuning starts from: the default or learned context, or for
        CoCoOp the one its meta-net generates from the original view ``feats[:1]``."""
        if self.source is not None and hasattr(self.source, "image_context"):
            return self.source.image_context(feats[:1])[0]
        return self.prompts.ctx

    def entropy_steps(self, params: list[torch.Tensor], logits_of) -> None:
        """``steps`` AdamW steps (a fresh optimizer) on the averaged entropy of the views chosen
        from ``logits_of()``'s first output (TPT keeps the first selection)."""
        cfg = self.config
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        chosen = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                logits = logits_of()
                if chosen is None:
                    chosen = self.select(logits.detach())
                loss = averaged_entropy(logits[chosen])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def tune(self, feats: torch.Tensor, ctx0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A fresh copy of the starting context, tuned on one image's view features [n_views, d];
        returns the tuned context."""
        ctx = (self.prompts.ctx if ctx0 is None else ctx0).detach().clone().float()
        if self.config.steps:
            ctx.requires_grad_(True)
            self.entropy_steps([ctx], lambda: self.backbone.logits(feats, self.prompts.text_features(ctx)))
        return ctx.detach()

    def tune_source(self, views: torch.Tensor) -> torch.Tensor:
        """Logits [1, C] of the original view after tuning every learned tensor of the adapter
        through its own forward on the views (MaPLe); the tensors are restored afterwards."""
        params = [p for n, p in self.source.named_parameters() if n in self.tuned_names]
        try:
            if self.config.steps:
                for p in params:
                    p.requires_grad_(True)
                self.entropy_steps(params, lambda: self.source(views))
            with torch.no_grad():
                self.source._text_cache = None
                return self.source(views[:1])
        finally:
            for p in params:
                p.requires_grad_(False)
            self.reset_test_state()

    def predict_one(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [1, C] of one image [C, H, W] after tuning on its views."""
        views = self.views(image)
        if not self.context_path:
            return self.tune_source(views)
        with torch.no_grad():
            feats = self.backbone.encode_image(views)
            ctx0 = self.initial_context(feats)
        ctx = self.tune(feats, ctx0)
        with torch.no_grad():
            return self.backbone.logits(feats[:1], self.prompts.text_features(ctx))
