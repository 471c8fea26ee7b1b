"""CAVPT / DPT, dual-modality prompt tuning with class-aware visual prompts (Xing et al., arXiv
2208.08340, IEEE TMM 2023; code: fanrena/DPT at 11fef90, ``trainers/DPT.py``).

Three learned parts: CoOp's text context (16 random vectors, class name at the end), deep VPT
tokens (10 per block, appended after the patch tokens before each block below ``bottom_limit``
and dropped after it), and from block ``bottom_limit`` on a class-aware visual prompt. A frozen
zero-shot pass (CLIP's image feature against the dataset's hand-written prompt) picks each image's
top-K classes (K = ``cpn``); their CoOp text features ``T[I]`` (unnormalized, with their gradient)
become, per CAVPT block j and image, K query tokens ``q = MetaNet_j(T[I])`` (Linear(d, width)) that
attend over the block's incoming image tokens (detached) and 10 learned tokens ``c_j``:
``a = Wv(softmax((Wq q)(Wk kv)ᵀ / √32) kv)``, ``prompt = LN2_j(a + q)`` enters block j in place of
the VPT tokens, and ``Cls_j(LN_j(a))`` (Linear(width, classes)) gives layer logits.
Logits ``z = s·f̂·T̂ᵀ``; with the zero-shot image feature ``f0`` and text features ``T0``,
``z1 = s·f̂0·T̂ᵀ`` and ``z2 = s·f̂·T̂0ᵀ``. Loss: CE(z1) + CE(z2) + 0.1·CE(z) in the first
``guidance_epochs`` (30), CE(z) afterwards, plus α·CE of the layer logits of the slots whose
selected class is the label (α 0.3, the script's). The parts train at their own rates: the
recipe's lr (0.01, 10 warm-up epochs) for the visual prompts and the CAVPT modules, 0.2× of it
(0.002) with 1 warm-up epoch for the context, through ``param_groups``.

Departures from the original code:
* fp32 throughout; the code forces the CAVPT module to fp16 (``.half()``), and with ``PREC: fp32``
  its float inputs then meet half weights and fail.
* ``bottom_limit`` is capped at the tower's depth (a 12 on a shallower tower = its last block);
  the code indexes past the blocks.
* the context's warm-up lr is the recipe's ``warmup_lr`` × 0.2 (adapt scales a group's whole
  schedule), where Dassl's constant warm-up sets 1e-5 in every optimizer.
* the code builds three SGD optimizers (visual prompts, CAVPT, context); one SGD with three
  parameter groups steps identically (SGD is per parameter).
* the hand-written prompt is the dataset's first template (the code's CUSTOM_TEMPLATES entry);
  K is capped at the class count, as the code does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.base import HandWrittenAnchor, MethodOutput, ParamGroup, as_output
from adapt.methods.deep_prompts import layer_tokens
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method


@dataclass
class CAVPTConfig:
    # CoOp context (train_single.sh: TRAINER.COOP.N_CTX 16, CTX_INIT "", CSC False, end)
    n_ctx: int = 16
    # deep VPT tokens per block below bottom_limit (TRAINER.VPT.N_CTX 10)
    n_vpt: int = 10
    # class-aware prompts per image: the zero-shot top-K classes (SELECTED_COVPT.CPN 10)
    cpn: int = 10
    # the 1-based block from which CAVPT replaces VPT (TOPDOWN_SECOVPT.BOTTOMLIMIT 12: on
    # ViT-B the last block only; 1 = every block); capped at the tower's depth
    bottom_limit: int = 12
    # learned key/value tokens per CAVPT block and the query/key width (hard-coded 10 and 32)
    n_kv_tokens: int = 10
    attn_dim: int = 32
    # "general knowledge guidance": epochs with CE(z1) + CE(z2) + guidance_weight·CE(z)
    # (PRETRAIN.C 30, the 0.1 hard-coded)
    guidance_epochs: int = 30
    guidance_weight: float = 0.1
    # weight of the layer logits' CE (TRAINER.ALPHA: 0.3 in train_single.sh, 1.0 in train.py)
    alpha: float = 0.3
    # the context's lr relative to the recipe's (0.002 / 0.01) and its own warm-up epochs
    context_lr_scale: float = 0.2
    context_warmup_epochs: int = 1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("n_ctx", "cpn", "bottom_limit", "n_kv_tokens", "attn_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("n_vpt", "guidance_epochs", "guidance_weight", "alpha", "context_lr_scale",
                    "context_warmup_epochs"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.init_std <= 0:
            raise ValueError(f"method.init_std must be > 0, got {self.init_std}")


class ClassAwarePrompts(nn.Module):
    """The code's ``CAVPT`` module: per CAVPT block, the meta-net, the attention, the two
    LayerNorms, the layer classifier and the learned key/value tokens."""

    def __init__(self, n_layers: int, embed_dim: int, width: int, n_classes: int, n_kv: int,
                 attn_dim: int, init_std: float):
        super().__init__()
        layers = range(n_layers)
        self.meta_nets = nn.ModuleList(nn.Linear(embed_dim, width) for _ in layers)
        self.q = nn.ModuleList(nn.Linear(width, attn_dim, bias=False) for _ in layers)
        self.k = nn.ModuleList(nn.Linear(width, attn_dim, bias=False) for _ in layers)
        self.v = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in layers)
        self.lns = nn.ModuleList(nn.LayerNorm(width) for _ in layers)
        self.classifiers = nn.ModuleList(nn.Linear(width, n_classes, bias=False) for _ in layers)
        self.lns2 = nn.ModuleList(nn.LayerNorm(width) for _ in layers)
        self.ctx = nn.Parameter(torch.empty(n_layers, n_kv, width).normal_(std=init_std))

    def forward(self, j: int, x: torch.Tensor, class_features: torch.Tensor):
        """Block j's prompts [B, K, W] and layer logits [B, K, C] from the tokens entering it
        ``x`` [B, N, W] and the selected classes' text features [B, K, d]."""
        q = self.meta_nets[j](class_features)
        kv = torch.cat([x.detach(), self.ctx[j].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        scores = self.q[j](q) @ self.k[j](kv).transpose(1, 2) / math.sqrt(self.q[j].out_features)
        a = self.v[j](torch.softmax(scores, dim=-1) @ kv)
        return self.lns2[j](a + q), self.classifiers[j](self.lns[j](a))


@register_method("cavpt")
class CAVPT(HandWrittenAnchor):
    Config = CAVPTConfig
    trainable_kind = "text context + deep visual prompts + class-aware visual prompts"
    # the class-aware prompts come from the image's top-K classes of the list
    couples_classes = True

    def __init__(self, config: CAVPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        depth, width = backbone.vision_depth, backbone.vision_width  # TypeError for non-ViT towers
        self.start = min(config.bottom_limit, depth) - 1  # the first CAVPT block (0-based)
        self.epoch = 0
        self.prompts = ContextPrompts(backbone, config.n_ctx, "", init_std=config.init_std)
        self.vpt = layer_tokens(backbone, self.start if config.n_vpt else 0, config.n_vpt, width, config.init_std)
        self.extractor = ClassAwarePrompts(depth - self.start, backbone.embed_dim, width, len(self.classnames),
                                           config.n_kv_tokens, config.attn_dim, config.init_std
                                           ).to(device=backbone.logit_scale.device, dtype=backbone.dtype)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        super().rebuild_classes()
        self.prompts.build(self.classnames)

    # ------------------------------------------------------------------ forward ----------------
    def run(self, images: torch.Tensor) -> MethodOutput:
        bb, k = self.backbone, min(self.config.cpn, len(self.classnames))
        with torch.no_grad():  # the frozen zero-shot pass: each image's top-K classes
            zs_image = bb.encode_image(images)
            zs_text = self.handcrafted()
            top = torch.sort(zs_image @ zs_text.t(), dim=-1, descending=True).indices[:, :k]
        raw = self.cached_text_features(lambda: self.prompts.text_features(normalize=False))
        text = F.normalize(raw, dim=-1)
        selected = raw[top]  # [B, K, d], unnormalized and with its gradient, as the code
        layer_logits = []

        def class_aware(j):
            def inject(x):
                prompt, logits = self.extractor(j, x, selected)
                layer_logits.append(logits)
                return prompt
            return inject

        # layer 0's VPT tokens enter after ln_pre, as the code appends them inside the transformer
        deep = [(lambda x, p=p: p) if i == 0 else p for i, p in enumerate(self.vpt)]
        deep += [None] * (self.start - len(deep))
        deep += [class_aware(j) for j in range(len(self.extractor.lns))]
        image = bb.encode_image(images, deep_prompts=deep)
        return MethodOutput(bb.logits(image, text), tensors={
            "zs_image_logits": bb.logits(zs_image, text), "zs_text_logits": bb.logits(image, zs_text),
            "layer_logits": torch.stack(layer_logits, dim=1), "top_k": top})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images).logits

    def output(self, images: torch.Tensor) -> MethodOutput:
        return self.run(images)

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out, cfg = as_output(out), self.config
        ce = F.cross_entropy(out.logits, labels)
        out.scalars["ce"] = ce.detach()
        if "layer_logits" not in out.tensors:
            return ce
        total = ce
        if self.epoch < cfg.guidance_epochs:
            image_ce = F.cross_entropy(out.tensors["zs_image_logits"], labels)
            text_ce = F.cross_entropy(out.tensors["zs_text_logits"], labels)
            total = image_ce + text_ce + cfg.guidance_weight * ce
            out.scalars.update(zs_image_ce=image_ce.detach(), zs_text_ce=text_ce.detach())
        layer = out.tensors["layer_logits"]  # [B, L, K, C]
        hit = (out.tensors["top_k"] == labels[:, None])[:, None].expand(-1, layer.shape[1], -1)
        if cfg.alpha and hit.any():
            target = labels[:, None, None].expand_as(hit)[hit]
            layer_ce = F.cross_entropy(layer[hit], target)
            out.scalars["layer_ce"] = layer_ce.detach()
            total = total + cfg.alpha * layer_ce
        return total

    # ------------------------------------------------------------------ hooks ------------------
    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self.epoch = epoch

    def param_groups(self) -> dict[str, ParamGroup]:
        groups = {"context": ParamGroup([self.prompts.ctx], lr_scale=self.config.context_lr_scale,
                                        warmup_epochs=self.config.context_warmup_epochs),
                  "cavpt": ParamGroup(list(self.extractor.parameters()))}
        if len(self.vpt):
            groups["vpt"] = ParamGroup(list(self.vpt))
        return groups
