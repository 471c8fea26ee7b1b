"""CPL (He et al., EMNLP 2022): CoCoOp trained against counterfactual image features.

Prompts and prediction are CoCoOp's. Training adds, for a sample x of class y: the stored image
feature x⁻ of the class most similar to y, a mask u* of the feature dimensions whose swap from x⁻
into x turns the frozen model's decision to that class, and the counterfactual

    u = clamp(m·u*_y + (1 − m)·u_θ[y], 0, 1),    x_cf = normalize((1 − u) ⊙ x + u ⊙ x̂⁻)

(m = 0.999; u_θ [C, d] is learned, initialised to ones; x and x̂⁻ normalized). With t_c the
sample's own prompt features (CoCoOp's, conditioned on x, never on x_cf):

    loss = CE(z, y) + λ · mean_b mean_c −log softmax([cos(t_c, x), cos(t_c, x_cf)])_0
                    + w · mean_b ‖u_b‖₂                      (λ = 1, w = 0.07)

u* (no gradient): starting from the raw frozen feature of x, greedily swap in the raw x⁻'s value
of the dimension that most raises x̂·t⁻ (unswapped dimensions only), until x̂·t⁻ > x̂·t_y or every
dimension is swapped; t are the frozen, unnormalized text features of the bare class names.
Swapped dimensions get 1, the rest −1 (so u is 0 there whatever u_θ is). If no dimension gives
x̂·t⁻ > 0 the last dimension is swapped, as the original's ``edit = -1`` index does. The search is
one vectorised pass over the batch, each step scoring all d candidate swaps in closed form.

Reference: eric-ai-lab/CPL at ce47190 (``CPL/trainers/cocoopcf.py``: ``CustomCLIP.forward``,
``cfgen``, ``init_score_dict``; ``CPL/utils/solver.py``: ``solver``, ``get_next_edit``,
``mupdate``; ``CPL/Dassl.pytorch/dassl/utils/tools.py``: ``xloss_compute``). The repository
ships no configs; the authors (issue #4) point to CoCoOp's vit_b16_c4_ep10_batch1_ctxv1 (4
context vectors "a photo of a", lr 0.002, batch 1, 10 epochs). Its code does not run as
published, so only its formulas are checked (``tests/test_cpl.py``).

Departures, each deliberate:
- Class similarity: the original ranks class names by BERTScore F1 (a RoBERTa model,
  precomputed into ``score.npy``). Here, by default, the cosine of CLIP's frozen text features of
  the hand-written prompts (the dataset's first template, ``templates`` / ``ensemble`` as in
  KgCoOp), among the method's classes, itself excluded, first best on ties. ``similarity`` takes
  a file instead (BERTScore's choice, or any other): JSON ``{"class": "most similar class"}`` or
  ``{"classnames": [...], "scores": [[...]]}``; CSV rows ``class,most_similar`` (a first row
  ``class,...`` is a header) or a square matrix (first row: a corner cell, then the class names;
  each row: a class name, then its scores). Names match after ``_`` → space and case folding;
  classes the method does not have are ignored (a whole-dataset table serves base-to-novel).
- The negative's image: the original keeps one training image per class (``cname2img``, a dict
  built from a set, so which image is left to hash order) and encodes it every step after a
  plain resize (``ntransform``). Here it is the class's first few-shot training item in the data
  module's order, encoded once in ``setup`` with the test transform, and kept as a feature.
- The mask: with its batch of 1, the original's ``cfgen`` broadcasts ``u[:, y]`` [d, 1] against
  x [1, d] and keeps row 0, so x and x⁻ are mixed by the *scalar* u[0, y] (x_cf is x⁻ if
  dimension 0 was swapped, else x, and then the term is the constant log 2). ``mix: mask``
  (the default) mixes per dimension, the ⊙ the formula means (the paper's own text was not read
  for this port); ``mix: first_dim`` reproduces the code.
  The u-norm term is over all d dimensions in both, as in the code.
- u* per sample: the original's ``solver`` fills one row per class, the first sample of that
  class in the batch winning; here each sample has its own (the same at batch 1). Its
  ``logit_scale`` (the raw parameter, positive for CLIP models) multiplies both sides of each
  comparison and is left out. The original's other paths (loading precomputed ``u`` from a
  Google Drive download, an undefined ``trained_solver``) are not reproduced.
- Reduction over the batch: the original returns ``CE + λ·Σ_b mean_c(…) + w·‖u‖`` with the
  norm per sample and ``.sum()``-s it, which at batch B counts CE and the Σ_b term B times; its
  ``cfgen`` only runs at B = 1 anyway. Here each term is a batch mean (identical at B = 1).
- Precision: fp32 on CPU, the engine's autocast on GPUs (the original: fp16 CLIP).
The original learns u_θ with the prompt learner; so does this (it is saved, one row per
training class, and never used at prediction, so a re-pointed CPL predicts as CoCoOp does). At
its initial ones u = 0.999 + 0.001 is exactly 1.0 in fp32, the clamp's bound, where torch
(2.14 here) passes no gradient, and on unswapped dimensions u is clamped at 0: u_θ only starts to
move once weight decay has pulled it below 1, and then at 0.001 of the mask's scale. The
original's u_θ is fp32 too; which torch it ran on, and so its gradient at the bound, is not
known. Logged: ``ce``, ``cf`` (the contrastive term), ``unorm``, ``edits`` (swapped dimensions).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.data.items import clean_classname
from adapt.methods.base import (HandWrittenAnchor, MethodOutput, as_output, check_templates,
                                is_features, items_of_classes, text_feature_mean)
from adapt.methods.cocoop import CoCoOp, CoCoOpConfig
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)
MIXES = ("mask", "first_dim")


@dataclass
class CPLConfig(CoCoOpConfig):
    # CoCoOp's vit_b16_c4_ep10_batch1_ctxv1 (the authors, issue #4): n_ctx 4, "a photo of a"
    lam: float = 1.0        # λ of the counterfactual term (``lam = 1`` in CustomCLIP.forward)
    u_weight: float = 0.07  # weight of ‖u‖₂ (``control_scale = 0.07``)
    u_momentum: float = 0.999  # m in u = clamp(m·u* + (1−m)·u_θ, 0, 1) (``mupdate``)
    mix: str = "mask"       # "mask": per dimension (the formula's ⊙); "first_dim": the code's scalar u[0]
    # most-similar-class table (JSON / CSV, see the module docstring); null = CLIP text cosine
    similarity: Optional[str] = None
    # hand-written prompt(s) of the text-cosine similarity; null = the dataset's first template
    templates: Optional[list[str]] = None
    ensemble: bool = False
    DEFAULT_N_CTX: ClassVar[int] = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0 or self.u_weight < 0:
            raise ValueError(f"lam and u_weight must be >= 0, got lam={self.lam}, u_weight={self.u_weight}")
        if not 0 <= self.u_momentum <= 1:
            raise ValueError(f"u_momentum must be in [0, 1], got {self.u_momentum}")
        if self.mix not in MIXES:
            raise ValueError(f"mix={self.mix!r} is not one of {MIXES}")
        if self.similarity is not None and Path(self.similarity).suffix.lower() not in (".json", ".csv"):
            raise ValueError(f"similarity={self.similarity!r}: give a .json or .csv file (see the cpl docstring)")
        check_templates(self.templates)


# ------------------------------------------------------------------------------ formulas -------
@torch.no_grad()
def greedy_edit_mask(x: torch.Tensor, x_neg: torch.Tensor, t_true: torch.Tensor,
                     t_neg: torch.Tensor) -> torch.Tensor:
    """u* [B, d] in {−1, 1} of ``get_next_edit``'s greedy search on raw features (see the module
    docstring): 1 where a dimension of ``x_neg`` was swapped into ``x``."""
    x, xn, tt, tn = (t.float() for t in (x, x_neg, t_true, t_neg))
    x = x.clone()
    b, d = x.shape
    picked = torch.zeros(b, d, dtype=torch.bool, device=x.device)  # the search's S
    swapped = torch.zeros_like(picked)                             # what u* marks
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    rows = torch.arange(b, device=x.device)
    for _ in range(d):
        # x̂·t⁻ after swapping each dimension i alone: (x·t⁻ + δ_i t⁻_i) / ‖x + δ_i e_i‖
        dot = (x * tn).sum(-1, keepdim=True)
        sq = (x * x).sum(-1, keepdim=True)
        score = (dot + (xn - x) * tn) / (sq + xn * xn - x * x).clamp_min(1e-30).sqrt()
        score = score.masked_fill(picked, float("-inf"))
        best = score.argmax(-1)
        positive = score[rows, best] > 0  # else the original's edit = -1: the last dimension
        edit = torch.where(positive, best, torch.full_like(best, d - 1))
        r, e = rows[active], edit[active]
        x[r, e] = xn[r, e]
        swapped[r, e] = True
        picked[r[positive[active]], e[positive[active]]] = True
        xh = F.normalize(x, dim=-1)
        active &= ~((xh * tn).sum(-1) > (xh * tt).sum(-1))
        if not active.any():
            break
    return swapped.float() * 2 - 1


def mixing_weights(u_star: torch.Tensor, u_theta: torch.Tensor, m: float) -> torch.Tensor:
    """``mupdate``: u = clamp(m·u* + (1 − m)·u_θ, 0, 1)."""
    return torch.clamp(m * u_star + (1.0 - m) * u_theta, 0.0, 1.0)


def counterfactual(x: torch.Tensor, x_neg: torch.Tensor, u: torch.Tensor, mix: str = "mask") -> torch.Tensor:
    """normalize((1 − u) ⊙ x + u ⊙ x⁻), per dimension, or with the scalar u[:, 0] (``first_dim``)."""
    if mix == "first_dim":
        u = u[:, :1]
    return F.normalize((1 - u) * x + u * x_neg, dim=-1)


def contrastive_term(text: torch.Tensor, x: torch.Tensor, x_cf: torch.Tensor) -> torch.Tensor:
    """``xloss_compute`` per sample, averaged over classes [B]: mean_c −log softmax([cos(t_c, x),
    cos(t_c, x_cf)])_0 with ``text`` [B, C, d] the sample's own prompt features."""
    pos = F.cosine_similarity(text, x.unsqueeze(1), dim=-1)
    neg = F.cosine_similarity(text, x_cf.unsqueeze(1), dim=-1)
    return -F.log_softmax(torch.stack((pos, neg), -1), dim=-1)[..., 0].mean(-1)


# ------------------------------------------------------------------------------ similarity -----
def _key(name: str) -> str:
    return clean_classname(name).casefold()


def _read_table(file: Path):
    """(pairs, None) for a class → most-similar-class table, (None, (names, scores)) for a matrix."""
    if file.suffix.lower() == ".json":
        data = json.loads(file.read_text())
        if isinstance(data, dict) and "scores" in data:
            return None, (data.get("classnames"), data["scores"])
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return list(data.items()), None
        raise ValueError('expected {"class": "most similar class"} or {"classnames": [...], "scores": [[...]]}')
    rows = [r for r in csv.reader(file.read_text().splitlines()) if any(c.strip() for c in r)]
    if rows and len(rows[0]) == 2:  # class,most_similar rows; a first row "class,..." is a header
        pairs = rows[1:] if _key(rows[0][0]) == "class" else rows
        if any(len(r) != 2 for r in pairs):
            raise ValueError("every row needs two cells, class,most_similar")
        return [tuple(r) for r in pairs], None
    names = rows[0][1:] if rows else []
    if [r[0] for r in rows[1:]] != names:
        raise ValueError("a matrix needs a header row (a corner cell, then the class names) and one row "
                         "per class in the same order")
    return None, (names, [[float(v) for v in r[1:]] for r in rows[1:]])


def read_similarity(path: str, classnames: Sequence[str]) -> list[int]:
    """For each of ``classnames``, the index of its most similar class, from a table file."""
    file = Path(path)
    fix = ("; fix the file (or leave method.similarity unset for CLIP text similarity), "
           "the format is in the cpl docstring")
    if not file.is_file():
        raise ValueError(f"cpl: method.similarity={path!r} is not a file")
    try:
        pairs, matrix = _read_table(file)
        if matrix is not None:
            names, scores = matrix[0], torch.tensor(matrix[1], dtype=torch.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"cpl: cannot read the similarity table {path}: {err}{fix}") from None
    index = {_key(c): i for i, c in enumerate(classnames)}
    if matrix is not None:  # the best other class among the method's own
        if not isinstance(names, list) or tuple(scores.shape) != (len(names), len(names)):
            raise ValueError(f"cpl: the similarity matrix in {path} must be square over its classnames{fix}")
        pos = {_key(n): i for i, n in enumerate(names)}
        missing = [c for c in classnames if _key(c) not in pos]
        if missing:
            raise ValueError(f"cpl: the similarity table {path} has no row for {len(missing)} class(es): "
                             f"{', '.join(missing[:8])}{fix}")
        cols = torch.tensor([pos[_key(c)] for c in classnames])
        return scores[cols][:, cols].fill_diagonal_(float("-inf")).argmax(-1).tolist()
    mapping: dict[str, str] = {}
    problems = [f"{k!r} is listed twice" for k, v in pairs if _key(mapping.setdefault(_key(k), v)) != _key(v)]
    missing = [c for c in classnames if _key(c) not in mapping]
    unknown = sorted({v for k, v in mapping.items() if k in index and _key(v) not in index})
    own = [c for c in classnames if _key(mapping.get(_key(c), "")) == _key(c)]
    if missing:
        problems.append(f"no entry for {len(missing)} class(es): {', '.join(missing[:8])}")
    if unknown:
        problems.append(f"most-similar classes that are not among the {len(classnames)} training "
                        f"classes: {', '.join(unknown[:8])}")
    if own:
        problems.append(f"classes named as their own most similar: {', '.join(own[:8])}")
    if problems:
        raise ValueError(f"cpl: the similarity table {path}: {'; '.join(problems)}{fix}")
    return [index[_key(mapping[_key(c)])] for c in classnames]


# ------------------------------------------------------------------------------ method ---------
@register_method("cpl")
class CPL(HandWrittenAnchor, CoCoOp):
    Config = CPLConfig
    trainable_kind = "text context + meta-net (+ per-class mask weights)"

    def __init__(self, config: CPLConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        # u_θ, one row per training class (the original's [d, C], transposed); training only
        self.u_theta = nn.Parameter(torch.ones(len(self.classnames), backbone.embed_dim,
                                               device=backbone.logit_scale.device, dtype=backbone.dtype))
        self._u_classes = list(self.classnames)
        self._setup_classes: Optional[list[str]] = None  # the classes the buffers below are for
        for name in ("neighbour", "negative_features", "name_features"):
            self.register_buffer(name, None, persistent=False)

    def setup(self, datamodule) -> None:
        """The most similar class of each class, its stored image's frozen feature, and the bare
        class names' text features; every problem is reported here, before training."""
        names = list(self.classnames)
        if names != self._u_classes:
            raise ValueError(f"cpl learns its mask weights u_θ for the {len(self._u_classes)} classes it was "
                             f"built with; it is now pointed at {len(names)} others: build a new cpl for them")
        if len(names) < 2:
            raise ValueError("cpl needs at least 2 classes (each sample's counterfactual comes from another class)")
        if self.config.similarity:
            neighbour = read_similarity(self.config.similarity, names)
        else:
            text = self.handcrafted().float()
            sim = text @ text.t()
            sim.fill_diagonal_(float("-inf"))
            neighbour = sim.argmax(-1).tolist()
        dm = datamodule
        items = items_of_classes(dm.train_items, dm.train_classnames, names)
        first = {}
        for it in items:  # the class's first few-shot item, in the data module's order
            first.setdefault(it.label, it)
        needed = sorted(set(neighbour))
        lacking = [names[c] for c in needed if c not in first]
        if lacking:
            users = [names[i] for i, n in enumerate(neighbour) if names[n] in lacking]
            raise ValueError(
                f"cpl: {len(lacking)} class(es) are the most similar class of another but have no training "
                f"image to make its counterfactual from: {', '.join(lacking[:8])} (for {', '.join(users[:8])}); "
                "give every class a training image, or pass method.similarity naming classes that have one")
        cached = dm.encode(self.backbone, [first[c] for c in needed], dm.test_transform(), "train", normalize=False)
        device = self.u_theta.device
        negatives = torch.zeros(len(names), self.backbone.embed_dim, device=device)
        negatives[torch.tensor(needed, device=device)] = cached.features[0].to(device).float()
        self.register_buffer("neighbour", torch.tensor(neighbour, device=device), persistent=False)
        self.register_buffer("negative_features", negatives, persistent=False)
        bare = text_feature_mean(self.backbone, names, ["{}"], normalize_each=False, normalize_mean=False)
        self.register_buffer("name_features", bare.float(), persistent=False)
        self._setup_classes = names
        pairs = ", ".join(f"{names[i]} -> {names[n]}" for i, n in enumerate(neighbour[:6]))
        log.info("cpl: most similar classes (%s): %s%s", "table" if self.config.similarity else "CLIP text",
                 pairs, ", ..." if len(names) > 6 else "")

    def neighbours(self) -> dict[str, str]:
        """Each training class's most similar class (after ``setup``)."""
        if self._setup_classes is None:
            return {}
        names = self._setup_classes
        return {names[i]: names[int(n)] for i, n in enumerate(self.neighbour.tolist())}

    def _logits_and_text(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_cls, limit = len(self.classnames), self.config.max_prompts_per_pass
        group = len(feats) if limit == 0 else max(1, limit // n_cls)
        logits, texts = [], []
        for part in feats.split(group):  # CoCoOp's grouping
            text = self.prompts.text_features_per_image(self.image_context(part))
            logits.append(self.backbone.logits(part, text))
            texts.append(text)
        return torch.cat(logits), torch.cat(texts)

    def output(self, x: torch.Tensor) -> MethodOutput:
        raw = x if is_features(x) else self.encode_images(x)
        feats = F.normalize(raw, dim=-1)
        logits, text = self._logits_and_text(feats)
        return MethodOutput(logits, {"image_features": feats, "raw_image_features": raw, "text_features": text})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out, cfg = as_output(out), self.config
        ce = F.cross_entropy(out.logits, labels)
        out.scalars["ce"] = ce.detach()
        if cfg.lam == 0 and cfg.u_weight == 0:
            return ce
        if "text_features" not in out.tensors:
            raise ValueError("cpl's loss needs the prompt features of the step: pass it what output(x) returns")
        if self._setup_classes is None or self._setup_classes != list(self.classnames):
            raise ValueError("cpl's loss needs setup(datamodule) for its current classes first (the stored "
                             "negatives and the class similarity come from the training data)")
        raw = out.tensors["raw_image_features"].float()
        x = out.tensors["image_features"].float()
        text = out.tensors["text_features"].float()
        neg = self.neighbour[labels]
        x_neg = self.negative_features[neg]
        u_star = greedy_edit_mask(raw, x_neg, self.name_features[labels], self.name_features[neg])
        u = mixing_weights(u_star, self.u_theta[labels].float(), cfg.u_momentum)
        x_cf = counterfactual(x, F.normalize(x_neg, dim=-1), u, cfg.mix)
        cf = contrastive_term(text, x, x_cf).mean()
        unorm = u.norm(dim=-1).mean()
        out.scalars.update(cf=cf.detach(), unorm=unorm.detach(), edits=(u_star > 0).float().sum(-1).mean())
        return ce + cfg.lam * cf + cfg.u_weight * unorm
