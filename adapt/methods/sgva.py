"""SgVA-CLIP (Peng et al., IEEE TMM 2023; FannierPeng/SgVA-CLIP, loss ``newi2i+kd+i2t``, test head
``Fuse_af``): CoOp's learned context plus a residual visual adapter trained against class prototypes.

With f the frozen image feature, z = f/‖f‖, P the image tower's output projection and t_c CoOp's
prompted text features (n_ctx 4):
    v  = f · pinv(P)                                   (RN: (f − b) · pinv(Wᵀ) of attnpool.c_proj)
    u  = ReLU(α · W₂ ReLU(W₁ v) + (1 − α) · v),  W₁: d→2d, W₂: 2d→d, no bias, α learnable (0.5)
    û  = u/‖u‖,  p̂_c = mean of û over the training images of class c (not renormalized)
    L  = CE(s⟨û, p̂⟩, y) − Σ_c softmax(s⟨z, t_c⟩/T) log softmax(s⟨ûP, t_c⟩/T) + CE(s⟨z, t⟩, y)
    logits = λ · s⟨û, p̂_c⟩ + (1 − λ) · s⟨z, t_c⟩,   T = 5, λ = 0.5, s = exp(logit_scale)
The three loss terms are logged as ``vision``, ``kd`` and ``cross``.

Decisions and departures from the original:
- v is recovered by the pseudo-inverse of the projection, as the original (``--visual-pre T``),
  not the true pre-projection token: it keeps the method on the frozen projected features, so the
  feature cache serves it. A tower without a projection uses v = f.
- The KD teacher s⟨z, t_c⟩ is *not* detached, as the original: the KD term also moves the prompts.
  ``detach_teacher: true`` detaches it.
- Episodes: the original trains on 50-way 16-shot episodes (support = prototypes, query = loss).
  Here every batch is the query set and the prototypes come, each step, from the whole K-shot
  training set (its features encoded once in ``setup`` with the test transform, then through the
  current adapter with gradients): all C classes instead of 50 sampled ones, so the vision CE is
  over all classes. A query's own (unaugmented) feature is part of its class's prototype.
- The cross-modal CE is on every image of the batch, not on one query per class.
- ``ctx_init: ensemble`` averages the token embeddings (positions 1..n_ctx) of the seven 4-word
  phrases the original's coop_4.py defines as IMAGENET_TEMPLATES for that purpose (it overrides
  the 80 imported templates); the prompts then read "X X X X <class>." as the original.
- Prototypes for evaluation are rebuilt whenever the adapter changed (on ``eval()``, at the end of
  fitting, before saving, and lazily in ``forward`` if the adapter's tensors moved), so evaluation
  always uses the final adapter's prototypes; they are saved with the adapter (an export carries
  them, so it needs no training data). Prototypes are per class: no re-pointing to new classes.
- λ is fixed (0.5, the original's ``meta_test`` and ImageNet); its val-set fitting of λ is not done.
- fp32 or the backbone's dtype throughout (the original is fp16); SGD without Nesterov (adapt's
  optimizer has no Nesterov switch). Learning rates: the recipe's lr is the prompt's (ImageNet
  16-shot 5e-2) and the adapter's is ``adapter_lr_scale`` times it (0.8 → 4e-2), via param_groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import Method, MethodOutput, ParamGroup, as_output, items_of_every_class
from adapt.methods.prompts import ContextPrompts, check_context_config
from adapt.methods.registry import register_method

# the original's ``--ctx-init ensemble`` phrases (models/coop_4.py, IMAGENET_TEMPLATES)
ENSEMBLE_PHRASES = ("x itap of a", "a bad photo of", "x x a origami", "a photo of large",
                    "in video game a", "x art of the", "a photo of small")


@dataclass
class SgVAConfig:
    n_ctx: int = 4
    # "ensemble" (the original's --ctx-init ensemble), a text ("a photo of a"), or "" (random)
    ctx_init: str = "ensemble"
    class_token_position: str = "end"
    init_std: float = 0.02
    # adapter hidden width = hidden_mult · d (--adapter-dim _dim_x2); α's start value
    hidden_mult: float = 2.0
    alpha: float = 0.5
    temperature: float = 5.0  # --temp
    fuse_lambda: float = 0.5  # weight of the prototype logits at inference
    detach_teacher: bool = False
    adapter_lr_scale: float = 0.8  # adapter lr / prompt lr (ImageNet 16-shot: 4e-2 / 5e-2)

    def __post_init__(self) -> None:
        check_context_config(self.n_ctx, "" if self.ctx_init == "ensemble" else self.ctx_init,
                             self.class_token_position)
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.fuse_lambda <= 1:
            raise ValueError(f"fuse_lambda must be in [0, 1], got {self.fuse_lambda}")
        if self.hidden_mult <= 0 or self.adapter_lr_scale < 0:
            raise ValueError("hidden_mult must be > 0 and adapter_lr_scale >= 0")


class WeightAdapter(nn.Module):
    """u = ReLU(α · W₂ ReLU(W₁ v) + (1 − α) · v), no biases, α a learned scalar."""

    def __init__(self, dim: int, hidden: int, alpha: float = 0.5):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden, bias=False)
        self.linear2 = nn.Linear(hidden, dim, bias=False)
        self.alpha = nn.Parameter(torch.tensor([float(alpha)]))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.linear1.weight.dtype)
        out = self.linear2(F.relu(self.linear1(v)))
        return F.relu(self.alpha * out + (1 - self.alpha) * v)


def projection_of(backbone):
    """(P, b): the image tower's output map f = v·P + b, or (None, None) without one."""
    visual = backbone.model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        return proj.detach(), None
    if isinstance(proj, nn.Linear):
        return proj.weight.detach().t(), None if proj.bias is None else proj.bias.detach()
    c_proj = getattr(getattr(visual, "attnpool", None), "c_proj", None)
    if isinstance(c_proj, nn.Linear):
        return c_proj.weight.detach().t(), None if c_proj.bias is None else c_proj.bias.detach()
    return None, None


@register_method("sgva")
class SgVA(Method):
    Config = SgVAConfig
    trainable_kind = "text context + visual adapter"
    supports_feature_cache = True
    normalize_features = False  # the pseudo-inverse reads the raw feature, as the original
    repointable = False  # the prototypes are one per training class

    def __init__(self, config: SgVAConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        device, dtype = backbone.logit_scale.device, backbone.dtype
        ensemble = config.ctx_init == "ensemble"
        self.prompts = ContextPrompts(backbone, config.n_ctx, "" if ensemble else config.ctx_init,
                                      False, config.class_token_position, len(self.classnames),
                                      config.init_std)
        if ensemble:
            with torch.no_grad():
                emb = backbone.embed_tokens(backbone.tokenize(list(ENSEMBLE_PHRASES)))
                self.prompts.ctx.data = emb[:, 1:1 + config.n_ctx].float().mean(0).to(dtype)
        proj, bias = projection_of(backbone)
        if proj is None:
            proj = torch.eye(backbone.embed_dim, device=device)
        proj = proj.float().to(device)
        self.register_buffer("proj", proj.to(dtype), persistent=False)  # [width, d]
        self.register_buffer("unproj", torch.linalg.pinv(proj).to(dtype), persistent=False)  # [d, width]
        self.register_buffer("proj_bias", None if bias is None else bias.to(device, dtype), persistent=False)
        width = proj.shape[0]
        self.adapter = WeightAdapter(width, max(1, int(width * config.hidden_mult)), config.alpha).to(
            device=device, dtype=dtype)
        self.register_buffer("prototypes", torch.zeros(len(self.classnames), width, device=device, dtype=dtype))
        self.train_features: Optional[torch.Tensor] = None  # raw K-shot features [n, d], from setup
        self.train_labels: Optional[torch.Tensor] = None
        self._proto_version: Optional[tuple] = None
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.prompts.build(self.classnames)

    # ------------------------------------------------------------------ prototypes -------------
    def setup(self, datamodule) -> None:
        """Encode the K-shot training images once (test transform) and build the prototypes."""
        dm = datamodule
        items = items_of_every_class(dm.train_items, dm.train_classnames, self.classnames,
                                     "sgva needs training images of every class for its prototypes")
        cached = dm.encode(self.backbone, items, dm.test_transform(), "train", normalize=False)
        self.train_features = cached.features[0].to(self.prototypes.device)
        self.train_labels = cached.labels.to(self.prototypes.device, torch.long)
        self.refresh_prototypes(force=True)

    def _adapter_version(self) -> tuple:
        return tuple(p._version for p in self.adapter.parameters())

    def class_means(self, adapted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p̂ [C, width]: the mean of the normalized adapted features of each class."""
        onehot = F.one_hot(labels, len(self.classnames)).to(adapted.dtype)
        return (onehot.t() @ adapted) / onehot.sum(0).clamp_min(1)[:, None]

    def prototypes_now(self) -> torch.Tensor:
        """The prototypes of the current adapter, with its graph (training)."""
        return self.class_means(self.adapted(self.train_features), self.train_labels)

    def refresh_prototypes(self, force: bool = False) -> None:
        if self.train_features is None or (not force and self._proto_version == self._adapter_version()):
            return
        with torch.inference_mode(False), torch.no_grad():
            self.prototypes.copy_(self.prototypes_now().to(self.prototypes.dtype))
        self._proto_version = self._adapter_version()

    # ------------------------------------------------------------------ features ---------------
    def unproject(self, f: torch.Tensor) -> torch.Tensor:
        f = f.to(self.unproj.dtype)
        if self.proj_bias is not None:
            f = f - self.proj_bias
        return f @ self.unproj

    def adapted(self, f: torch.Tensor) -> torch.Tensor:
        """û: the normalized adapter output of raw image features f."""
        return F.normalize(self.adapter(self.unproject(f)), dim=-1)

    def text_features(self) -> torch.Tensor:
        return self.cached_text_features(self.prompts.text_features)

    def branches(self, f: torch.Tensor, prototypes: torch.Tensor, text: torch.Tensor):
        """(prompt logits s⟨z, t⟩ (CoOp's), prototype logits s⟨û, p̂⟩, û)."""
        z = F.normalize(f, dim=-1)
        clip_logits = self.backbone.logits(z, text)
        u = self.adapted(f)
        proto_logits = self.backbone.logit_scale * u @ prototypes.to(u.dtype).t()
        return clip_logits, proto_logits, u

    def fuse(self, clip_logits: torch.Tensor, proto_logits: torch.Tensor) -> torch.Tensor:
        lam = self.config.fuse_lambda
        return lam * proto_logits + (1 - lam) * clip_logits.to(proto_logits.dtype)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.train_features is None and self._proto_version is None and not self.prototypes.any():
            raise RuntimeError("sgva has no prototypes yet: call setup(datamodule) with the few-shot "
                               "data, or load an exported adapter")
        self.refresh_prototypes()
        clip_logits, proto_logits, _ = self.branches(image_features, self.prototypes, self.text_features())
        return self.fuse(clip_logits, proto_logits)

    def output(self, x: torch.Tensor) -> MethodOutput:
        f = self.image_features_of(x)
        if self.train_features is None:
            raise RuntimeError("sgva trains against prototypes of its training set: call setup(datamodule)")
        text = self.text_features()
        clip_logits, proto_logits, u = self.branches(f, self.prototypes_now(), text)
        # the student of the implicit KD: û mapped back through the projection, against t_c
        back = u @ self.proj.to(u.dtype)
        if self.proj_bias is not None:
            back = back + self.proj_bias.to(u.dtype)
        student = self.backbone.logit_scale * back @ text.to(back.dtype).t()
        return MethodOutput(self.fuse(clip_logits, proto_logits),
                            {"clip_logits": clip_logits, "proto_logits": proto_logits, "student_logits": student})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        if "proto_logits" not in out.tensors:
            return F.cross_entropy(out.logits, labels)
        clip_logits, proto, student = (out.tensors[k].float() for k in ("clip_logits", "proto_logits", "student_logits"))
        T = self.config.temperature
        teacher = clip_logits.detach() if self.config.detach_teacher else clip_logits
        vision = F.cross_entropy(proto, labels)
        kd = -(F.softmax(teacher / T, dim=-1) * F.log_softmax(student / T, dim=-1)).sum(-1).mean()
        cross = F.cross_entropy(clip_logits, labels)
        out.scalars.update(vision=vision.detach(), kd=kd.detach(), cross=cross.detach())
        return vision + kd + cross

    # ------------------------------------------------------------------ hooks / state ----------
    def param_groups(self) -> dict[str, ParamGroup]:
        return {"prompt": ParamGroup([self.prompts.ctx]),
                "adapter": ParamGroup(list(self.adapter.parameters()), lr_scale=self.config.adapter_lr_scale)}

    def train(self, mode: bool = True):
        out = super().train(mode)
        if not mode and hasattr(self, "prototypes"):
            self.refresh_prototypes()
        return out

    def on_fit_end(self) -> None:
        self.refresh_prototypes()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        self.refresh_prototypes()  # what is saved matches the adapter saved with it
        return super().trainable_state()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(state)
        self._proto_version = self._adapter_version()  # the loaded prototypes are the loaded adapter's

    def scalars(self) -> dict[str, float]:
        return {"alpha": float(self.adapter.alpha.detach()), "fuse_lambda": self.config.fuse_lambda}
