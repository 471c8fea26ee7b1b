"""SuS-X (Udandarao, Gupta, Albanie; ICCV 2023): TIP-X, training-free, on a support set.

The support set (``data.support``: a folder of generated or retrieved images, the world's
renderer, retrieval from a captioned world pool, or the K-shot training images) gives keys F
[M, d] (normalized image features) and one-hot values L [M, C]. For a normalized image feature
f, with W the hand-written text classifier [C, d]:

    logits = 100·f·Wᵀ + α·exp(−β(1 − f·Fᵀ))·L + γ·(−ψ(KL))·L
    P = softmax(f·Wᵀ / T),  Q = softmax(F·Wᵀ / T),  T = 0.5
    KL_j = Σ_c P_c (log P_c − log Q_jc)        (the image's class signature against support j's)

ψ is the min-max rescale of KL values into the range of the affinities f·Fᵀ. α, β, γ are
searched on the validation split over the original's grid (α: 0.1 + i·49.9/20, i < 20;
β: 1 + i·49/200, i < 200; γ: 0.1 + i·29.9/50, i < 50; the first best of the loops α, β, γ in
that order wins, as the original's strict >), all 200,000 triples scored at once per β. At γ = 0
this is Tip-Adapter without training; at α = γ = 0 it is zero-shot CLIP. The text classifier of
the original is "combined": CuPL's sentences plus its 7 templates -- here ``method.templates``
(default those 7) and ``data.class_text.descriptions`` with ``data.class_text.templates=true``.

Departures from the original code (vishaal27/SuS-X, tipx.py), each deliberate:

1. Every row of the KL matrix is computed. The original fills it in blocks of 100 rows over
   ``range(N // 100)``, so the last N mod 100 images keep KL = 0 (the most similar value, the
   same for every support image): their KL term is a constant of the class counts.
2. ψ is one affine map, fitted on the validation images (their KL range into their affinity
   range) and applied to every image after, so a test image's logits depend on it alone, not
   on the batch or the rest of the test set. The original rescales the test KL matrix by its own
   min / max into the *validation* affinity range (a variable left over from the search loop),
   so test and validation mixed their ranges.
3. The search runs on the data module's validation split, never on test. The original's
   dataloader returns val = test for CIFAR-10/100 and ImageNet, so there it searched on test.
   Without validation images, α, β, γ keep the config's values and ψ's map is fitted on the
   support set against itself (the original has no such case).
4. fp32 throughout; the original keeps CLIP's fp16 features and one-hot matrix on the GPU.
5. log P is ``log_softmax`` (the original takes the log of the softmax: the same up to round-off,
   with no log 0).
6. The support images are encoded once with the test transform (the original averages ten passes
   of its deterministic preprocess: the same features). The few-shot variant (``data.support.
   source=train``) averages ``augment_epochs`` augmented passes (crop 0.5-1 + flip), as the
   original's few-shot TIP-X does with Tip-Adapter's keys.
7. Nothing trained, so the support keys, labels, α, β, γ and ψ's map are the adapter.

Without a declared support set (a direct ``setup`` call) the data module hands the training
images, as ``source: train``; recipes must declare one (``requires_data``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from adapt.methods.base import check_crop_scale, check_templates, items_of_classes, items_of_every_class
from adapt.methods.registry import register_method
from adapt.methods.tip_adapter import TipAdapter, search_grid

log = logging.getLogger(__name__)

# the original's text ensemble beside CuPL's sentences (its "combined" classifier)
ORIGINAL_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                      "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
SUPPORT = ("a support set of labelled images that are not the training split: source=folder (with "
           "data.support.folder), world, retrieval, or train (few-shot TIP-X)")


@dataclass
class SuSXConfig:
    # temperature of the class signatures P and Q
    temperature: float = 0.5
    # used without validation images (the original always searches)
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    # the original's grid: alpha and gamma from 0.1, beta from 1, each up to (not reaching) max
    search: bool = True
    alpha_max: float = 50.0
    alpha_steps: int = 20
    beta_max: float = 50.0
    beta_steps: int = 200
    gamma_max: float = 30.0
    gamma_steps: int = 50
    # the hand-written classifier's templates; null = the dataset's (all of them with ensemble)
    templates: Optional[list[str]] = field(default_factory=lambda: list(ORIGINAL_TEMPLATES))
    ensemble: bool = True
    # multiplier of the zero-shot logits: the original's hard-coded 100; null = the backbone's own
    clip_logit_scale: Optional[float] = 100.0
    # few-shot support (source=train) only: augmented passes averaged into the keys
    augment_epochs: int = 10
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # Tip-Adapter-F's trainable keys: TIP-X has none
    finetune: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("alpha, beta and gamma must be >= 0")
        if min(self.alpha_steps, self.beta_steps, self.gamma_steps) < 1:
            raise ValueError("alpha_steps, beta_steps and gamma_steps must be >= 1")
        if self.alpha_max <= 0.1 or self.gamma_max <= 0.1 or self.beta_max <= 1:
            raise ValueError("alpha_max and gamma_max must be > 0.1 and beta_max > 1 (where the grids start)")
        if self.clip_logit_scale is not None and self.clip_logit_scale <= 0:
            raise ValueError(f"clip_logit_scale must be > 0 (or null for the model's), got {self.clip_logit_scale}")
        if self.augment_epochs < 0:
            raise ValueError(f"augment_epochs must be >= 0, got {self.augment_epochs}")
        check_templates(self.templates, "method.templates")
        check_crop_scale(self.crop_scale)


@register_method("susx")
class SuSX(TipAdapter):
    Config = SuSXConfig
    trainable_kind = "none (support-set cache, α/β/γ searched on val)"
    requires_data = {"support.source": SUPPORT}

    def __init__(self, config: SuSXConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        device = backbone.logit_scale.device
        # γ and ψ's affine map (KL range -> affinity range): saved, so an export scores alike
        for name, value in (("gamma", config.gamma), ("kl_min", 0.0), ("kl_max", 1.0), ("aff_min", 0.0),
                            ("aff_max", 1.0)):
            self.register_buffer(name, torch.tensor(float(value), device=device))
        self.support_report: dict = {}

    # ------------------------------------------------------------------ support ----------------
    def _rebuild_values(self) -> None:
        super()._rebuild_values()
        # log Q of every support image, derived from the keys and the classes: not saved
        keys = self.cache_keys.float()
        log_q = torch.log_softmax(keys @ self.text_features.float().t() / self.config.temperature, dim=-1)
        self.register_buffer("support_log_q", log_q, persistent=False)

    def setup(self, datamodule) -> None:
        """Encode the support set (through the feature cache), fit ψ and search α, β, γ on the
        validation images."""
        cfg, dm = self.config, datamodule
        support = dm.support_set(self.backbone)
        items = items_of_every_class(support.items, support.classnames, self.classnames,
                                     f"susx needs {support.source} support images of every class")
        augment = cfg.augment_epochs if support.augmented else 0
        self._set_cache(*self.encode_keys(dm, items, augment, root=support.root, split=support.split))
        self.support_report = dict(support.report)
        with torch.no_grad():
            for name in ("alpha", "beta", "gamma"):
                getattr(self, name).fill_(getattr(cfg, name))
        self.search_result, self._val = None, None
        val = items_of_classes(dm.val_items, dm.train_classnames, self.classnames)
        if val:
            cached = dm.encode(self.backbone, val, dm.test_transform(), "val")
            self._val = (cached.features[0], cached.labels)
        f = torch.nn.functional.normalize(self._val[0].float(), dim=-1) if val else self.cache_keys.float()
        self.fit_psi(f.to(self.cache_keys.device))
        if cfg.search and val:
            self.search_hparams()
        elif cfg.search:
            log.info("susx: no validation images; keeping alpha=%g beta=%g gamma=%g, psi fitted on the "
                     "support set itself", cfg.alpha, cfg.beta, cfg.gamma)

    # ------------------------------------------------------------------ TIP-X terms ------------
    def kl_divergence(self, f: torch.Tensor) -> torch.Tensor:
        """KL(P_i ‖ Q_j) of every image against every support image [N, M] (every row)."""
        log_p = torch.log_softmax(f.float() @ self.text_features.float().t() / self.config.temperature, dim=-1)
        p = log_p.exp()
        return (p * log_p).sum(-1, keepdim=True) - p @ self.support_log_q.t()

    def fit_psi(self, f: torch.Tensor) -> None:
        """ψ's map from the KL and affinity ranges of the images ``f`` (the validation set)."""
        kl, affinity = self.kl_divergence(f), f.float() @ self.cache_keys.float().t()
        with torch.no_grad():
            for name, value in (("kl_min", kl.min()), ("kl_max", kl.max()), ("aff_min", affinity.min()),
                                ("aff_max", affinity.max())):
                getattr(self, name).fill_(float(value))

    def psi(self, kl: torch.Tensor) -> torch.Tensor:
        """The min-max rescale of KL values into the affinity range, in the original's order of
        operations (so that the search's near-ties fall the same way); a flat KL range maps to
        the range's bottom."""
        spread = self.kl_max - self.kl_min
        y = (kl - self.kl_min) / torch.where(spread > 0, spread, torch.ones_like(spread))
        y = y * (self.aff_max - self.aff_min)
        return y + self.aff_min

    def kl_logits(self, f: torch.Tensor) -> torch.Tensor:
        return -self.psi(self.kl_divergence(f)) @ self.cache_values.float()

    def _cache_logits(self, f: torch.Tensor, beta) -> torch.Tensor:
        # exp(−(β − β·a)), written as the original writes it: the same rounding, the same ties
        affinity = f.float() @ self.cache_keys.float().t()
        return ((-1) * (beta - beta * affinity)).exp() @ self.cache_values.float()

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.cache_keys.shape[0] == 0:
            raise RuntimeError("susx has no support set yet: call setup(datamodule) with data.support "
                               "declared, or load an exported adapter")
        f = image_features.float()
        zs = self.zero_shot_logits(f).float()
        # summed in the original's order: clip + kl·γ + cache·α
        return zs + self.kl_logits(f) * self.gamma + self._cache_logits(f, self.beta) * self.alpha

    # ------------------------------------------------------------------ α / β / γ --------------
    def grids(self) -> tuple[list[float], list[float], list[float]]:
        cfg = self.config
        return (search_grid(cfg.alpha_max, cfg.alpha_steps), search_grid(cfg.beta_max, cfg.beta_steps, start=1.0),
                search_grid(cfg.gamma_max, cfg.gamma_steps))

    def search_hparams(self) -> Optional[dict]:
        """Score every (α, β, γ) of the grid on the stored validation features at once per β;
        sets and returns the first best triple in the original's loop order (α, β, γ)."""
        if self._val is None:
            return None
        device = self.cache_keys.device
        f = torch.nn.functional.normalize(self._val[0].to(device).float(), dim=-1)
        y = self._val[1].to(device)
        alphas, betas, gammas = self.grids()
        with torch.no_grad():
            before = int((self.forward_features(f).argmax(-1) == y).sum())
            zs, kl = self.zero_shot_logits(f).float(), self.kl_logits(f)
            a = torch.tensor(alphas, device=device).repeat_interleave(len(gammas))  # pairs, α-major
            g = torch.tensor(gammas, device=device).repeat(len(alphas))
            chunk = max(1, 2 ** 24 // max(1, zs.numel()))  # bounds the [pairs, N, C] block
            correct = torch.empty(len(betas), len(a), dtype=torch.long)
            for j, beta in enumerate(betas):
                cache = self._cache_logits(f, beta)
                correct[j] = torch.cat([
                    ((zs + kl * gc[:, None, None] + cache * ac[:, None, None]).argmax(-1) == y).sum(-1).cpu()
                    for ac, gc in zip(a.split(chunk), g.split(chunk))])
            order = correct.view(len(betas), len(alphas), len(gammas)).permute(1, 0, 2).reshape(-1)
            first = int((order == order.max()).nonzero()[0])  # α, then β, then γ: the loops' order
            ia, rest = divmod(first, len(betas) * len(gammas))
            ib, ig = divmod(rest, len(gammas))
            best = (int(order[first]), alphas[ia], betas[ib], gammas[ig])
            for name, value in zip(("alpha", "beta", "gamma"), best[1:]):
                getattr(self, name).fill_(value)
        n = len(y)
        self.search_result = {"alpha": best[1], "beta": best[2], "gamma": best[3], "val_acc": 100.0 * best[0] / n,
                              "val_acc_before": 100.0 * before / n, "val_images": n}
        log.info("susx: alpha=%.4g beta=%.4g gamma=%.4g chosen on %d validation images (acc %.2f%%, %.2f%% "
                 "before)", *best[1:], n, 100.0 * best[0] / n, 100.0 * before / n)
        return self.search_result

    def scalars(self) -> dict[str, float]:
        out = {**super().scalars(), "gamma": float(self.gamma)}
        out.update({k: float(v) for k, v in self.support_report.items() if isinstance(v, (int, float))})
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(state)
        self._rebuild_values()  # log Q of the loaded keys
