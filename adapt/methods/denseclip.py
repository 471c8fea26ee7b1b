"""DenseCLIP (Rao et al., CVPR 2022, "DenseCLIP: Language-Guided Dense Prediction with
Context-Aware Prompting"), semantic segmentation; the original is raoyongming/DenseCLIP@5eda47f
(``segmentation/denseclip/{denseclip.py,models.py,heads.py}``, the ViT-B/16 ADE20K config
``configs/denseclip_fpn_vit-b_640x640_80k.py``). Per image, with V = [g; Z] the image tower's
pooled feature and final patch tokens ``proj(ln_post(x_L))`` and t_k the class prompts
``[SOS] p_1 … p_8 <name> [EOS]`` through the frozen text tower (adapt's CoOp prompt path)::

    t'_k = t_k + γ ⊙ Dec(t, V)                 γ ∈ R^C, init 1e-4 (adapt/methods/denseclip_decoder.py)
    S    = Ẑ · t̂'_k                            score map [B, K, h, w], cosines, no temperature
    x_2  ← concat(x_2, S)                       x_1..x_4: the taps' token maps at 4x, 2x, 1x, 1/2x
    logits = FPNHead(FPN(x_1..x_4))             [B, K, 4h, 4w]
    loss = CE(logits↑) + 0.4 · CE((S / 0.07)↑)  (the identity head), pixel CE ignoring 255

The context p is shared by the classes, [1, 8, C_text], initialised as the code does it:
``nn.init.trunc_normal_`` at its defaults, std 1 cut at ±2 (``ctx_init_std``; the paper's 0.02
would be CoOp's). Class names must fit the text context of 5 (SOS, name, EOS: at most 3 BPE
tokens; ``name_context_length``), as the original's ``tokenize`` insists. The text tower is frozen
in both variants (the original's lr_mult 0).

Two registered variants, because changing the backbone is a class property read before any
config applies (as clippr / clippr_ft):

* ``denseclip_ft``: the original. The image tower fine-tunes at 0.1x the lr (its ``backbone``
  lr_mult, which also covers the ViT's pyramid convs ``fpn1..4``: here ``ViTLevels`` in that group).
* ``denseclip``: the image tower frozen (the PEFT-spirit variant); the same modules train.
  Its dense features still come from the images every step: the segmentation task stores no
  label maps beside cached features (``Segmentation.cacheable = False``), so no feature cache.

Taps: blocks 3, 5, 7, 11 of ViT-B/16 (0-based); for a tower of L blocks, ``round(L·f) − 1`` for
f = 1/3, 1/2, 2/3, 1 (ViT-L/14: 7, 11, 15, 23; 4 blocks: 0, 1, 2, 3), or ``taps`` set by hand.

Departures, deliberate:

* The pyramid layout is the patch-16 one (``fpn1`` 4x … ``fpn4`` 1/2x of the token grid) for
  any patch size, so that the score map always joins level 2 at the token grid (the original's
  patch-8 layout puts level 2 at 1/2x, where the score map would not fit). Its SyncBatchNorm
  and the FPN head's SyncBN are BatchNorm2d (per-process statistics under DDP).
* ViT towers only: the RN50/RN101 variant (score map into layer4, attnpool tokens) is not built.
* No drop-path in the fine-tuned tower (open_clip's blocks have none; the original: 0.1).
* Losses are adapt's pixel CE, the mean over the pixels that are not ignored (mmseg 0.19's
  CrossEntropyLoss divides by all pixels, ignored ones included).
* The positional embedding is resampled bicubically for other grids (the original: bilinear).
* Training augmentation is the segmentation task's (random resized crop of scale 0.5-1 to the
  crop size and a flip), not mmseg's resize-ratio 0.5-2 / random crop with cat_max_ratio 0.75 /
  photometric distortion; test images are resized to the short side ``data.image_size`` (the
  original: 2048x640 keep-ratio) and slid over 640/426 (``data.slide_window``) as the original.
* The poly schedule (power 0.9, min lr 1e-6, 1500 linear warm-up iterations) is the engine's
  ``optim.scheduler=poly`` over optimizer steps (the warm-up starts at lr/1500, not lr·1e-6).
* Parameters whose original name holds "norm" (the decoder layers' LayerNorms) get weight decay
  0 through the group ``norms`` (the original's ``paramwise_cfg``); nothing else is exempted.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import Method, MethodOutput, ParamGroup, as_output
from adapt.methods.denseclip_decoder import FPN, ContextDecoder, FPNHead, ViTLevels
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method

TAP_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1.0)
SCORE_LEVEL = 2  # the ViT level at the token grid, where the score map joins (the original's index)


def default_taps(depth: int) -> list[int]:
    """DenseCLIP's 3, 5, 7, 11 of 12 blocks, spread alike over ``depth`` blocks."""
    return [max(0, round(depth * f) - 1) for f in TAP_FRACTIONS]


@dataclass
class DenseCLIPConfig:
    n_ctx: int = 8  # learned context tokens (the ViT config: text context 13 = 8 + 5)
    ctx_init_std: float = 1.0  # the code's trunc_normal_ defaults (std 1, cut at ±2 std)
    name_context_length: int = 5  # SOS + class name + EOS must fit
    decoder_width: int = 256
    decoder_heads: int = 4
    decoder_layers: int = 3
    decoder_dropout: float = 0.1
    gamma_init: float = 1e-4
    taps: Optional[list[int]] = None  # null = the rule above (3, 5, 7, 11 for 12 blocks)
    neck_channels: int = 256
    head_channels: int = 256
    head_dropout: float = 0.1
    tau: float = 0.07  # the identity head's temperature
    aux_weight: float = 0.4  # the identity head's loss weight (0 = off)

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.name_context_length < 3:
            raise ValueError(f"method.n_ctx must be >= 1 and method.name_context_length >= 3 (SOS, a name, "
                             f"EOS), got {self.n_ctx} and {self.name_context_length}")
        if self.taps is not None and len(self.taps) != 4:
            raise ValueError(f"method.taps names the 4 blocks whose tokens feed the pyramid (ViT-B/16: "
                             f"[3, 5, 7, 11]), got {list(self.taps)}")
        if self.tau <= 0 or self.aux_weight < 0 or self.decoder_width % self.decoder_heads:
            raise ValueError("method.tau must be > 0, method.aux_weight >= 0 and method.decoder_width a "
                             "multiple of method.decoder_heads")


@dataclass
class DenseCLIPFineTuneConfig(DenseCLIPConfig):
    backbone_lr_scale: float = 0.1  # the original's lr_mult for the image tower


@register_method("denseclip")
class DenseCLIP(Method):
    """DenseCLIP with the image tower frozen: prompts, context decoder, γ, pyramid, FPN and head train."""

    Config = DenseCLIPConfig
    trainable_kind = "text context + context decoder + FPN decoder"
    tasks = ("segmentation",)
    repointable = False  # the head's classifier and the neck's score-map channels are per class

    def __init__(self, config: DenseCLIPConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        if not hasattr(self.backbone.model.visual, "class_embedding"):
            raise ValueError(f"{self.name} reads a ViT image tower's token maps; {backbone.config.name!r} "
                             "is a ResNet (DenseCLIP's RN variant is not built here): use a ViT backbone")
        depth, width, dim = self.backbone.vision_depth, self.backbone.vision_width, self.backbone.embed_dim
        self.taps = list(config.taps) if config.taps is not None else default_taps(depth)
        bad = [t for t in self.taps if not 0 <= t < depth]
        if bad:
            raise ValueError(f"method.taps {bad} are outside the image tower's {depth} blocks (0..{depth - 1})")
        self.prompts = ContextPrompts(self.backbone, config.n_ctx, name_suffix="")
        with torch.no_grad():
            std = config.ctx_init_std
            nn.init.trunc_normal_(self.prompts.ctx, std=std, a=-2 * std, b=2 * std)
        self.gamma = nn.Parameter(torch.full((dim,), config.gamma_init))
        self.context_decoder = ContextDecoder(dim, config.decoder_width, config.decoder_heads,
                                              config.decoder_layers, config.decoder_dropout)
        k = len(self.classnames)
        self.levels = ViTLevels(width)
        self.neck = FPN([width + (k if i == SCORE_LEVEL else 0) for i in range(4)], config.neck_channels)
        self.decode_head = FPNHead(k, (config.neck_channels,) * 4, channels=config.head_channels,
                                   dropout=config.head_dropout)
        self.rebuild_classes()

    # ------------------------------------------------------------------ classes ----------------
    def rebuild_classes(self) -> None:
        self.check_names()
        self.prompts.build(self.classnames)

    def check_names(self) -> None:
        """Every class name fits the name context (SOS + name + EOS) and the whole prompt the
        text tower's context; one message names every name that does not."""
        limit = self.config.name_context_length
        lengths = {n: self.backbone.token_count(n) for n in self.classnames}
        long = [f"{n!r} ({m} tokens)" for n, m in lengths.items() if m + 2 > limit]
        if long:
            need = max(lengths.values()) + 2
            raise ValueError(f"{self.name}'s text context holds [SOS] + a class name + [EOS] in "
                             f"method.name_context_length={limit} tokens (names of at most {limit - 2} BPE "
                             f"tokens), but {len(long)} class name(s) are longer: {', '.join(long[:8])}"
                             f"{' ...' if len(long) > 8 else ''}; shorten them or set "
                             f"method.name_context_length={need}")
        context = self.backbone.tokenize(["x"]).shape[1]
        if self.config.n_ctx + limit > context:
            raise ValueError(f"method.n_ctx={self.config.n_ctx} + method.name_context_length={limit} tokens do "
                             f"not fit {self.backbone.config.name!r}'s text context of {context}")

    # ------------------------------------------------------------------ forward ----------------
    def text_features(self) -> torch.Tensor:
        """t [K, C]: the context prompts through the frozen text tower, unnormalised (the original's)."""
        return self.cached_text_features(lambda: self.prompts.text_features(normalize=False))

    def encode_dense(self, images: torch.Tensor):
        """(pooled [B, C], tokens [B, C, h, w], the taps' token maps), the frozen tower's without a graph."""
        with contextlib.nullcontext() if self.changes_backbone else torch.no_grad():
            dense = self.backbone.encode_image_dense(images, outputs=("pooled", "tokens"), taps=self.taps,
                                                     normalize=False)
        dtype = self.gamma.dtype
        return dense.pooled.to(dtype), dense.as_map("tokens").to(dtype), [dense.levels[t].to(dtype) for t in self.taps]

    def score_map(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """S [B, K, h, w] = Ẑ · t̂' with t' = t + γ ⊙ Dec(t, [g; Z])."""
        b = tokens.shape[0]
        visual = torch.cat([pooled[:, None], tokens.flatten(2).transpose(1, 2)], dim=1)  # [B, 1 + hw, C]
        text = self.text_features().to(tokens.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, K, C]
        text = text + self.gamma * self.context_decoder(text, visual)
        return torch.einsum("bchw,bkc->bkhw", F.normalize(tokens, dim=1), F.normalize(text, dim=-1))

    def output(self, images: torch.Tensor) -> MethodOutput:
        pooled, tokens, maps = self.encode_dense(images)
        score = self.score_map(pooled, tokens)
        levels = self.levels(maps)
        levels[SCORE_LEVEL] = torch.cat([levels[SCORE_LEVEL], score], dim=1)
        logits = self.decode_head(self.neck(levels))
        return MethodOutput(logits, tensors={"score_map": score})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Segmentation logits [B, K, 4h, 4w] (h, w: the patch grid)."""
        return self.output(images).logits

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        decode = self.task.loss(out.logits, labels)
        score = out.tensors.get("score_map")
        if score is None or self.config.aux_weight == 0:
            return decode
        aux = self.task.loss(score / self.config.tau, labels)
        out.scalars.update(decode=decode.detach(), aux_identity=aux.detach())
        return decode + self.config.aux_weight * aux

    # ------------------------------------------------------------------ optimisation -----------
    def _own(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")}

    def param_groups(self) -> dict[str, ParamGroup]:
        own = self._own()
        norms = [p for n, p in own.items() if n.startswith("context_decoder.decoder.") and ".norm" in n]
        rest = [p for p in own.values() if all(p is not q for q in norms)]
        return {"params": ParamGroup(rest), "norms": ParamGroup(norms, weight_decay_scale=0.0)}


@register_method("denseclip_ft")
class DenseCLIPFineTune(DenseCLIP):
    """DenseCLIP as the original trains it: the image tower fine-tuned at 0.1x the lr."""

    Config = DenseCLIPFineTuneConfig
    trainable_kind = "image tower + text context + context decoder + FPN decoder"
    changes_backbone = True

    def __init__(self, config: DenseCLIPFineTuneConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.visual = [n for n, _ in self.backbone.named_parameters() if n.startswith("model.visual.")]
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in self.visual)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.visual}

    def param_groups(self) -> dict[str, ParamGroup]:
        groups = super().param_groups()
        levels = {id(p) for p in self.levels.parameters()}
        params = dict(self.backbone.named_parameters())
        groups["params"].params = [p for p in groups["params"].params if id(p) not in levels]
        groups["backbone"] = ParamGroup([params[n] for n in self.visual] + list(self.levels.parameters()),
                                        lr_scale=self.config.backbone_lr_scale)
        return groups
