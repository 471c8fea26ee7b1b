"""Linear probe (Radford et al., ICML 2021, CLIP's evaluation protocol): multinomial logistic
regression on the frozen image features, its L2 strength chosen on the validation split.

As CoOp's re-run of that protocol (KaiyangZhou/CoOp, lpclip/): raw (unnormalized) image features
of the test transform, sklearn's ``LogisticRegression(solver="lbfgs", max_iter=1000, C=c)``
objective, i.e. ``C · Σ CE + ½‖W‖²`` with an unpenalized bias, solved here full-batch with
torch's L-BFGS (strong-Wolfe line search) on the method's device. ``C`` is searched on the
validation images: first 1e6, 1e4, …, 1e-6 (the first best wins), then ``search_steps`` rounds of
lpclip's log-space binary search between peak/10 and peak·10. Without validation images ``c`` is
used as it is. The fit happens in ``setup`` (no epochs, no engine optimizer): it is a convex
problem solved to convergence, as the protocol does.

The head is per class, so the probe cannot classify classes it never saw (base-to-novel): it
says so; ZS-LP (``zslp``) falls back to zero-shot weights for them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import Method, items_of_classes
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)

COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip's search_list, in its order


@dataclass
class LinearProbeConfig:
    # sklearn's C (inverse L2 strength) when there is no validation split to search it on
    c: float = 0.316
    # search C on the validation split (coarse grid, then the binary search)
    search: bool = True
    search_steps: int = 8  # lpclip --num_step
    max_iter: int = 1000  # L-BFGS iterations per fit (sklearn's max_iter in lpclip)

    def __post_init__(self) -> None:
        if self.c <= 0:
            raise ValueError(f"c must be > 0, got {self.c}")
        if self.search_steps < 0 or self.max_iter < 1:
            raise ValueError("search_steps must be >= 0 and max_iter >= 1")


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float,
                            max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [C, d] and bias [C] minimising ``c · Σ CE + ½‖W‖²`` (sklearn's objective, divided
    by ``c·n``), from zeros, full batch, in float64."""
    x = x.double()
    weight = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    penalty = 0.5 / (c * len(y))
    # stop as sklearn's lbfgs does (tol 1e-4 on the largest gradient entry of the objective
    # above), rescaled to this loss; strongly regularised fits then stop early, weakly
    # regularised ones on separable data run to max_iter, as there
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-4 * penalty * 2,
                            tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


@register_method("linearprobe")
class LinearProbe(Method):
    Config = LinearProbeConfig
    trainable_kind = "linear head (fitted at setup)"
    supports_feature_cache = True
    normalize_features = False  # lpclip fits the encoder's raw features
    repointable = False  # one weight row per training class
    repoint_fix = "method.name=zslp (zero-shot weights for unseen classes)"

    def __init__(self, config: LinearProbeConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        device = backbone.logit_scale.device
        self.weight = nn.Parameter(torch.zeros(len(self.classnames), backbone.embed_dim, device=device))
        self.bias = nn.Parameter(torch.zeros(len(self.classnames), device=device))
        self.chosen_c: Optional[float] = None
        self.val_acc: Optional[float] = None

    @property
    def is_trainable(self) -> bool:
        return False  # fitted in closed form by setup; the engine has nothing to train

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features.to(self.weight.dtype) @ self.weight.t() + self.bias

    def setup(self, datamodule) -> None:
        dm = datamodule
        items = items_of_classes(dm.train_items, dm.train_classnames, self.classnames)
        missing = set(range(len(self.classnames))) - {it.label for it in items}
        if missing:
            raise ValueError(f"linearprobe needs training images of every class; the data has none of "
                             f"{', '.join(self.classnames[i] for i in sorted(missing)[:5])}")
        train = dm.encode(self.backbone, items, dm.test_transform(), "train", normalize=False)
        device = self.weight.device
        x, y = train.features[0].to(device), train.labels.to(device)
        c = self.config.c
        val_items = items_of_classes(dm.val_items, dm.train_classnames, self.classnames)
        if self.config.search and val_items:
            val = dm.encode(self.backbone, val_items, dm.test_transform(), "val", normalize=False)
            c, self.val_acc = self.search_c(x, y, val.features[0].to(device), val.labels.to(device))
        elif self.config.search:
            log.info("linearprobe: no validation images; keeping c=%g", c)
        weight, bias = fit_logistic_regression(x, y, len(self.classnames), c, self.config.max_iter)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        self.chosen_c = c

    def search_c(self, x, y, xv, yv) -> tuple[float, float]:
        """lpclip's search: the coarse grid, then the binary search in log10 space."""
        n_cls, iters = len(self.classnames), self.config.max_iter

        def val_acc(c: float) -> float:
            w, b = fit_logistic_regression(x, y, n_cls, c, iters)
            return float(((xv.double() @ w.t() + b).argmax(-1) == yv).float().mean())

        accs = [val_acc(c) for c in COARSE_GRID]
        best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # the first best, as np.argmax
        peak, acc = COARSE_GRID[best], accs[best]
        left, right = math.log10(peak) - 1, math.log10(peak) + 1
        for _ in range(self.config.search_steps):
            acc_left, acc_right = val_acc(10 ** left), val_acc(10 ** right)
            if acc_left < acc_right:
                peak, acc, left = 10 ** right, acc_right, 0.5 * (left + right)
            else:
                peak, acc, right = 10 ** left, acc_left, 0.5 * (left + right)
        return peak, 100.0 * acc

    def scalars(self) -> dict[str, float]:
        out = {} if self.chosen_c is None else {"c": self.chosen_c}
        if self.val_acc is not None:
            out["val_acc"] = self.val_acc
        return out
