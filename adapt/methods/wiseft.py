"""WiSE-FT (Wortsman et al., CVPR 2022): fine-tune the image encoder end to end, then mix weights.

Training: the whole image tower and a linear head initialised from the zero-shot classifier
(weights ``exp(logit_scale) · t_c`` from the hand-written prompts, bias 0, on L2-normalized image
features, as WiSE-FT's ``ClassificationHead``) train together with cross-entropy; the text tower
stays frozen. After training (``on_fit_end``) every fine-tuned tensor is mixed with its zero-shot
value, ``θ(α) = (1 − α)·θ₀ + α·θ₁``. α is chosen on the validation images among ``alphas`` (the
paper's 0, 0.1, …, 1), never on test; ``results.json`` also reports every α of the sweep
(``evaluation_sweep``). The recipe carries the paper's optimisation: AdamW, lr 3e-5, weight decay
0.1, cosine per step after 500 warm-up steps (its ``cosine_lr``).

The adapter holds θ₁ (the image-tower tensors that differ from the pretrained ones it was
trained from, and the head) plus α; loading rebuilds θ(α) on that same backbone, and only there
(the backbone's name and tag are checked, as for every adapter).

Deliberate departures:
- few-shot recipes: batch 32 and 500 steps per shot (the paper fine-tunes on full ImageNet at
  batch 512 for 10 epochs), under the data module's shared augmentation (random resized crop
  0.08–1 and flip; the paper's fine-tuning crop is 0.9–1 without flip);
- with no validation images, α = ``default_alpha`` (0.5, the paper's recommendation without a
  held-out set); ties in the validation accuracy go to the smaller α (closer to zero-shot);
- novel classes (base-to-novel): classes the head was not trained on get their zero-shot row,
  so at α = 0 every class is exactly zero-shot CLIP.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import HandWrittenClassifier, check_templates, items_of_classes
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@dataclass
class WiSEFTConfig:
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    # a fixed α instead of the validation choice (null: chosen on validation)
    alpha: Optional[float] = None
    default_alpha: float = 0.5  # when there are no validation images
    templates: Optional[list[str]] = None  # the zero-shot head's templates (default: the dataset's)
    ensemble: bool = True  # the head from all the dataset's templates, as the paper's ensemble
    eval_batch_size: int = 64  # the validation pass that chooses α

    def __post_init__(self) -> None:
        check_templates(self.templates)
        values = list(self.alphas) + [self.default_alpha] + ([self.alpha] if self.alpha is not None else [])
        if not self.alphas or any(not 0 <= a <= 1 for a in values):
            raise ValueError(f"alphas, alpha and default_alpha must lie in [0, 1], got {values}")


@register_method("wiseft")
class WiSEFT(HandWrittenClassifier):
    Config = WiSEFTConfig
    trainable_kind = "image tower + head"
    changes_backbone = True
    repointable = True

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.trained_classnames = list(self.classnames)
        self.visual = [n for n, _ in self.backbone.named_parameters() if n.startswith("model.visual.")]
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in self.visual)
        self.rebuild_classes()
        head = self.text_features.detach().clone() * self.backbone.logit_scale.detach()
        self.head_weight = nn.Parameter(head)
        self.head_bias = nn.Parameter(torch.zeros(len(self.trained_classnames), dtype=head.dtype))
        self.register_buffer("alpha", torch.tensor(1.0))
        # θ0: the zero-shot values of everything that is fine-tuned (never saved)
        self._theta0 = {n: t.detach().clone() for n, t in self._mixed().items()}
        self._theta1: Optional[dict[str, torch.Tensor]] = None  # None: the live weights are θ1
        self._val_loader: Optional[Callable] = None
        self.chosen: dict[str, float] = {}

    # ------------------------------------------------------------------ classifier -------------
    def rebuild_classes(self) -> None:
        super().rebuild_classes()  # zero-shot rows of the current classes (for unknown ones)
        known = {c: i for i, c in enumerate(getattr(self, "trained_classnames", self.classnames))}
        self._rows = [known.get(c, -1) for c in self.classnames]

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if rows == list(range(len(self.trained_classnames))):
            weight, bias = self.head_weight, self.head_bias
        else:  # other classes: trained rows where known, zero-shot rows elsewhere
            zs = self.text_features * self.backbone.logit_scale
            idx = torch.tensor([max(r, 0) for r in rows], device=zs.device)
            known = torch.tensor([r >= 0 for r in rows], device=zs.device)
            weight = torch.where(known[:, None], self.head_weight[idx], zs.to(self.head_weight.dtype))
            bias = torch.where(known, self.head_bias[idx], torch.zeros_like(self.head_bias[idx]))
        return F.linear(image_features, weight.to(image_features.dtype), bias.to(image_features.dtype))

    # ------------------------------------------------------------------ state ------------------
    def _mixed(self) -> dict[str, torch.Tensor]:
        """The tensors that are fine-tuned and mixed: the image tower and the head."""
        params = dict(self.backbone.named_parameters())
        out = {"backbone." + n: params[n] for n in self.visual}
        out.update(head_weight=self.head_weight, head_bias=self.head_bias)
        return out

    def backbone_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.visual}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """θ1 (image-tower tensors that differ from the pretrained ones, and the head) and α."""
        theta1 = self._theta1 or {n: t.detach() for n, t in self._mixed().items()}
        state = {n: t for n, t in theta1.items()
                 if not n.startswith("backbone.") or not torch.equal(t, self._theta0[n])}
        state["alpha"] = self.alpha.detach()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        allowed = set(self._theta0) | {"alpha"}
        unexpected = set(state) - allowed
        missing = {"alpha", "head_weight", "head_bias"} - set(state)
        if missing or unexpected:
            raise ValueError(f"{self.name} state mismatch: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        theta1 = {}
        for name, theta0 in self._theta0.items():
            value = state.get(name, theta0)  # absent: unchanged from the pretrained weights
            if value.shape != theta0.shape:
                raise ValueError(f"{self.name}: {name} has shape {tuple(value.shape)} in the saved "
                                 f"state but {tuple(theta0.shape)} here (other class list or backbone?)")
            theta1[name] = value.to(theta0.device, theta0.dtype).clone()
        self._theta1 = theta1
        self.set_alpha(float(state["alpha"]))
        self._text_cache = None

    def set_alpha(self, alpha: float) -> None:
        """Put θ(α) into the live weights (θ1 is kept aside the first time)."""
        if self._theta1 is None:
            self._theta1 = {n: t.detach().clone() for n, t in self._mixed().items()}
        with torch.no_grad():
            for name, live in self._mixed().items():
                theta0, theta1 = self._theta0[name], self._theta1[name]
                # the ends exactly: α=0 is zero-shot CLIP, α=1 the fine-tuned model
                live.copy_(theta0 if alpha == 0 else theta1 if alpha == 1 else torch.lerp(theta0, theta1, alpha))
            self.alpha.fill_(alpha)
        if alpha == 1.0:  # the live weights are θ1 again: training may continue from them
            self._theta1 = None

    # ------------------------------------------------------------------ after training ---------
    def setup(self, datamodule) -> None:
        """Keep a way to the validation images of this method's classes (for choosing α)."""
        dm = datamodule
        items = items_of_classes(dm.val_items, dm.train_classnames, self.trained_classnames)
        self._val_loader = (lambda: dm.dataloader(items, dm.test_transform(), self.config.eval_batch_size)) \
            if items else None

    def on_fit_end(self) -> None:
        cfg = self.config
        if cfg.alpha is not None:
            alpha, how = cfg.alpha, "fixed"
        elif self._val_loader is None:
            alpha, how = cfg.default_alpha, "default (no validation images)"
        else:
            alpha, how = self.choose_alpha(self._val_loader()), "validation"
        self.set_alpha(alpha)
        log.info("wiseft: alpha=%g (%s)", alpha, how)

    def choose_alpha(self, loader) -> float:
        """The α of ``config.alphas`` with the best accuracy on ``loader`` (validation images)."""
        was_training = self.training
        self.eval()
        device = self.head_weight.device
        batches = [(x.to(device), y.to(device)) for x, y in loader]
        accs = {}
        with torch.no_grad():
            for a in sorted(self.config.alphas):
                self.set_alpha(a)
                hits = sum(int((self(x).argmax(-1) == y).sum()) for x, y in batches)
                accs[a] = 100.0 * hits / max(1, sum(len(y) for _, y in batches))
        self.train(was_training)
        best = max(accs.values())
        alpha = min(a for a, acc in accs.items() if acc == best)
        self.chosen = {"alpha": alpha, "val_acc": best}
        return alpha

    def scalars(self) -> dict[str, float]:
        return {"alpha": float(self.alpha), **({"val_acc": self.chosen["val_acc"]} if self.chosen else {})}

    def evaluation_sweep(self):
        """results.json reports every α of ``alphas``: (name, values, apply, value to restore)."""
        return "alpha", sorted(self.config.alphas), self.set_alpha, float(self.alpha)
