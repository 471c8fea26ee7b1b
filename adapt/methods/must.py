"""MUST (Li, Savarese & Hoi, ICLR 2023, "Masked Unsupervised Self-training for Label-free Image
Classification"; salesforce/MUST, engine_self_training.py, clip/model.py, build_dataset.py):
the whole CLIP image tower and a classifier W initialised from the zero-shot text features are
fine-tuned on unlabelled images against an EMA teacher, with masked image modelling.

    teacher on the weak view:    q = softmax(T(x_w)),  ŷ = argmax q,  keep = max q > τ
    student on the masked strong view (masked patch embeddings = a mask token, ``patch_mask``):
    logits = s · normalize(ln_post(z_cls) P) · W
    L = CE(logits[keep], ŷ[keep]) − w_fair · mean_c log p̄_c + L1(decoder(ln_patch(z)), x_s | masked)
        + w_align · mean over masked patches ‖normalize(ln_patch(z_i) P) − normalize(ln_post(z_cls) P)‖²

p̄ is the batch's mean student softmax; for C ≥ ``fair_average_classes`` (512) it is averaged
with the previous step's (detached) within an epoch and the term divided by 0.5. The decoder is
Conv1×1(width → p²·3) + PixelShuffle(p) on the last block's patch tokens; L1 on normalised pixels
of the masked blocks only. The teacher is the EMA of every trainable tensor (``adapt/methods/
ema.py``), decay ramped from ``ema_decay_init`` to ``ema_decay`` over ``ema_warm_steps`` steps,
updated after every optimizer step (``Method.on_optimizer_step``); it is saved with the student,
so checkpoints resume it. The mask: ⌈ratio · (size / mask_patch)²⌉ random blocks of
mask_patch × mask_patch pixels per image. Weak view: resize + random crop; strong: random resized
crop (0.3–1) + flip + RandAugment (``Method.train_transform``). Layer-wise lr decay 0.65 (patch
and position embeddings, ln_pre and the mask token are layer 0, block i is i + 1, the rest top),
no weight decay on 1-D tensors (its mask token is [1, 1, W] and keeps it), as its optim_factory. Defaults are its ImageNet ViT-B/16 config
(train_configs.json) and argparse: τ 0.7, ratio 0.3, mask_patch 32, w_align 0.2, w_fair 1, EMA
0.999 → 0.9998 over 2000 steps; the recipes carry AdamW (wd 0.05), lr × batch / 256, cosine per
step to min_lr, no warm-up. Prediction: the student (the original's acc1, which picks its
checkpoint); ``predict_with: teacher`` uses the EMA.

Departures (each a choice, never silent):
- trainable set as the original (the whole image tower, W, mask token, ln_patch, decoder); the
  text tower is kept frozen (the original deletes it). ``must_lora`` is a PEFT variant the
  original does not have: rank-2 LoRA (CLIP-LoRA's placement and α/√r scaling, no dropout) on
  the image tower's q, k, v in place of the tower's weights.
- logit scale: the backbone's exp(t) (``logit_scale: null``); the original hard-codes 100,
  which is OpenAI CLIP's own; the world's tiny CLIP has 25.5 and τ would mean another thing.
- a batch with no confident sample gives L_st = 0 (the original's CE of nothing is NaN and ends
  the run); ``mask_ratio: 0`` masks nothing and drops L_mim and L_align (the original's
  ``--mask`` off path: L = L_st + w_fair · L_fair).
- RandAugment is torchvision's (2 ops, magnitude 9 of 10, every op applied) for timm's
  ``rand-m9-mstd0.5-inc1`` (magnitude noise 0.5, each op with p 0.5, its own op set).
- masks are drawn from torch's generator on the batch's device, not numpy in the workers.
- p̄ is the process's own batch under DDP (the original all-gathers it with gradient); one
  device is the intended use. The moving average of p̄ is not checkpointed (restarts per epoch,
  as the original's does at step 0).
- W starts from the templates adapt ships for the dataset (ImageNet 8, most others 1; the
  original's templates.json has ImageNet 80, UCF101 48, Caltech101 34, DTD 8, SUN397 2);
  ``data.templates`` gives others.
- one device at batch 64 (the recipes), lr and min_lr scaled by batch / 256 as the original
  scales them for its 16 × 64; its EMA ramp is counted in steps of 16× smaller batches here.
- the last epoch is kept (the original saves its "best" by test accuracy); no test image selects.
- the teacher's tensors travel in the adapter too (twice the image tower's size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from adapt.data.transforms import BICUBIC, ToRGB
from adapt.methods.base import Method, MethodOutput, ParamGroup, as_output, check_crop_scale, check_templates
from adapt.methods.ema import EmaTeacher, ramped_decay
from adapt.methods.priors import batch_mean_probs
from adapt.methods.registry import register_method


@dataclass
class MUSTConfig:
    conf_threshold: float = 0.7  # τ: a pseudo-label counts when the teacher's max prob exceeds it
    mask_ratio: float = 0.3  # share of mask blocks replaced by the mask token
    mask_patch: int = 32  # a mask block's side in pixels (a multiple of the model's patch)
    w_align: float = 0.2  # global-local feature alignment
    w_fair: float = 1.0  # fairness: −mean log p̄
    w_mim: float = 1.0  # masked image modelling (the original's fixed 1)
    fair_average_classes: int = 512  # from this many classes, p̄ is averaged over steps
    ema_decay_init: float = 0.999  # model_ema_decay_init
    ema_decay: float = 0.9998  # --model_ema_decay, reached after ema_warm_steps
    ema_warm_steps: int = 2000  # warm_it
    layer_decay: float = 0.65  # lr × layer_decay^(depth + 1 − layer)
    logit_scale: Optional[float] = None  # null: the backbone's exp(t) (OpenAI CLIP: 100, as hard-coded there)
    strong_crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # --train_crop_min 0.3
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9  # of 10
    predict_with: str = "student"  # student | teacher (the EMA)
    templates: Optional[list[str]] = None  # W's initial text (null: the dataset's)
    ensemble: bool = True  # W from all the dataset's templates, as the original's templates.json

    def __post_init__(self) -> None:
        check_crop_scale(self.strong_crop_scale)
        check_templates(self.templates)
        if not 0 <= self.conf_threshold < 1 or not 0 <= self.mask_ratio < 1:
            raise ValueError(f"conf_threshold and mask_ratio lie in [0, 1), got {self.conf_threshold}, {self.mask_ratio}")
        if not 0 <= self.ema_decay_init <= 1 or not 0 <= self.ema_decay <= 1 or self.ema_warm_steps < 0:
            raise ValueError("ema_decay_init and ema_decay lie in [0, 1], ema_warm_steps >= 0")
        if self.mask_patch < 1 or not 0 < self.layer_decay <= 1 or min(self.w_align, self.w_fair, self.w_mim) < 0:
            raise ValueError("mask_patch >= 1, layer_decay in (0, 1], loss weights >= 0")
        if not 0 <= self.randaugment_magnitude <= 10 or self.randaugment_ops < 0:
            raise ValueError("randaugment_magnitude lies in 0..10, randaugment_ops >= 0")
        if self.predict_with not in ("student", "teacher"):
            raise ValueError(f"predict_with is student or teacher, got {self.predict_with!r}")


class WeakStrongViews:
    """A PIL image -> [2, 3, H, W]: MUST's weak view (resize, random crop) and strong view
    (random resized crop, flip, RandAugment). A class: DataLoader workers pickle it."""

    def __init__(self, size: int, mean, std, cfg: MUSTConfig):
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        self.weak = T.Compose([ToRGB(), T.Resize(size, interpolation=BICUBIC), T.RandomCrop(size), *tail])
        self.strong = T.Compose([
            ToRGB(), T.RandomResizedCrop(size, scale=tuple(cfg.strong_crop_scale), interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude, num_magnitude_bins=11),
            *tail])

    def __call__(self, image):
        return torch.stack([self.weak(image), self.strong(image)])


def layer_of(name: str, depth: int) -> int:
    """The original's layer id for lr decay: embeddings (its mask token's name has "embedding"),
    conv1 and ln_pre 0; resblock i → i + 1; everything else depth + 1."""
    parts = name.split(".")
    if "resblocks" in parts:
        return int(parts[parts.index("resblocks") + 1]) + 1
    if any(k in name for k in ("embedding", "conv1", "ln_pre", "mask_token")):
        return 0
    return depth + 1


@register_method("must")
class MUST(Method):
    """MUST: the image tower and a text-initialised classifier self-trained on unlabelled
    images against their EMA teacher, with masked image modelling and global-local alignment."""

    Config = MUSTConfig
    trainable_kind = "image tower + classifier (EMA self-training)"
    changes_backbone = True
    learns_unlabelled = True
    per_task_loss = False  # its fairness term reads the mean prediction over every class
    takes_class_text = True
    repointable = False  # W has one column per training class

    def __init__(self, config: MUSTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        v = self.backbone._vit()  # the one "needs a ViT image tower" message
        self.patch = int(v.conv1.stride[0])
        check_mask_geometry(self.backbone.image_size, config.mask_patch, self.patch)
        self.visual = self.tune_backbone()
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in self.visual)
        device, width = self.backbone.logit_scale.device, self.backbone.vision_width
        self.classifier = nn.Parameter(self.hand_written_text_features().t().clone())  # [d, C], as there
        self.mask_token = nn.Parameter(torch.zeros(width, device=device))
        nn.init.normal_(self.mask_token, std=0.02)
        self.ln_patch = nn.LayerNorm(width).to(device)
        self.decoder = nn.Sequential(nn.Conv2d(width, self.patch ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(self.patch)).to(device)
        self.teacher = EmaTeacher(self.live_tensors())
        self.decay = config.ema_decay_init
        self._fair_prev: Optional[torch.Tensor] = None

    def tune_backbone(self) -> list[str]:
        """The backbone tensors that train, by name under the backbone: the whole image tower."""
        return [n for n, _ in self.backbone.named_parameters() if n.startswith("model.visual.")]

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by its name under the method: what the teacher averages."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def use_class_text(self, class_text) -> None:
        super().use_class_text(class_text)
        with torch.no_grad():  # W (and its average) start from the new text, before training
            self.classifier.copy_(self.hand_written_text_features().t())
            self.teacher.averages()["classifier"].copy_(self.classifier)

    # ------------------------------------------------------------------ forward ----------------
    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        s = self.config.logit_scale
        scale = self.backbone.logit_scale.detach().to(pooled.dtype) if s is None else float(s)
        return scale * F.normalize(pooled, dim=-1) @ self.classifier.to(pooled.dtype)

    def student_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone.encode_image(images, normalize=False))

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.run(self, self.student_logits, images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_logits(x) if self.config.predict_with == "teacher" else self.student_logits(x)

    def draw_mask(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, HW] patch mask: ⌈ratio · blocks⌉ random mask blocks per image, as patches (None
        when the ratio masks nothing)."""
        size = images.shape[-1]
        check_mask_geometry(size, self.config.mask_patch, self.patch)
        side, scale = size // self.config.mask_patch, self.config.mask_patch // self.patch
        count = int(math.ceil(side * side * self.config.mask_ratio))
        if count == 0:
            return None
        b = images.shape[0]
        chosen = torch.rand(b, side * side, device=images.device).argsort(dim=1)[:, :count]
        blocks = torch.zeros(b, side * side, dtype=torch.bool, device=images.device).scatter_(1, chosen, True)
        blocks = blocks.view(b, side, side).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        return blocks.flatten(1)

    def output(self, x: torch.Tensor) -> MethodOutput:
        """Teacher on the weak view, student on the masked strong view (one view for both when
        the batch holds plain images, [B, 3, H, W])."""
        weak, strong = x.unbind(1) if x.dim() == 5 else (x, x)
        with torch.no_grad():
            probs = F.softmax(self.teacher_logits(weak).float(), dim=-1)
            score, pseudo = probs.max(dim=-1)
        mask = self.draw_mask(strong)
        tensors = {"pseudo_labels": pseudo, "confident": score > self.config.conf_threshold}
        if mask is None:
            return MethodOutput(self.student_logits(strong), tensors=tensors)
        last = self.backbone.vision_depth - 1
        dense = self.backbone.encode_image_dense(strong, outputs=("pooled",), taps=(last,), normalize=False,
                                                 patch_mask=mask, mask_token=self.mask_token)
        tokens = self.ln_patch(dense.levels[last].flatten(2).transpose(1, 2))  # [B, HW, width]
        b, hw, width = tokens.shape
        recon = self.decoder(tokens.transpose(1, 2).reshape(b, width, *dense.grid))
        pixels = mask.view(b, 1, *dense.grid).repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        tensors["mim"] = ((recon - strong).abs() * pixels).sum() / pixels.sum() / strong.shape[1]
        local = F.normalize(tokens @ self.backbone.model.visual.proj, dim=-1)
        pooled = F.normalize(dense.pooled, dim=-1)
        tensors["align"] = (local - pooled[:, None]).pow(2).sum(-1)[mask].mean()
        return MethodOutput(self.classify(dense.pooled), tensors=tensors)

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        """L_st + w_fair · L_fair (+ w_mim · L_mim + w_align · L_align when patches were masked);
        ``labels`` are never read (−1 for unlabelled data)."""
        out = as_output(out)
        if "pseudo_labels" not in out.tensors:
            raise ValueError("must's loss needs the teacher's pseudo-labels of its output(): pass output(x), not logits")
        cfg, t = self.config, out.tensors
        keep = t["confident"]
        st = F.cross_entropy(out.logits[keep], t["pseudo_labels"][keep]) if keep.any() else out.logits.sum() * 0
        fair = self.fairness(out.logits)
        loss = st + cfg.w_fair * fair
        out.scalars.update(st=st.detach(), fair=fair.detach(), conf_ratio=keep.float().mean(),
                           ema_decay=float(self.decay))
        if "mim" in t:
            loss = loss + cfg.w_mim * t["mim"] + cfg.w_align * t["align"]
            out.scalars.update(mim=t["mim"].detach(), align=t["align"].detach())
        return loss

    def fairness(self, logits: torch.Tensor) -> torch.Tensor:
        """−mean_c log p̄_c (= KL(uniform ‖ p̄) + log C); p̄ averaged with the last step's for
        many classes, as the original."""
        mean = batch_mean_probs(logits)
        if len(self.classnames) < self.config.fair_average_classes:
            return -torch.log(mean).mean()
        if self._fair_prev is not None and self.training:
            mean = 0.5 * (self._fair_prev.to(mean.device) + mean)
        self._fair_prev = mean.detach()
        return -torch.log(mean).mean() / 0.5

    # ------------------------------------------------------------------ hooks ------------------
    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self._fair_prev = None  # the original's p̄ restarts at each epoch's first step

    def on_optimizer_step(self, step: int) -> None:
        cfg = self.config
        self.decay = ramped_decay(step, cfg.ema_decay_init, cfg.ema_decay, cfg.ema_warm_steps)
        self.teacher.update(self.live_tensors(), self.decay)

    def train_transform(self, image_size: int, mean, std):
        return WeakStrongViews(image_size, mean, std, self.config)

    def param_groups(self) -> dict[str, ParamGroup]:
        """One group per (layer, decay or not): lr × layer_decay^(depth + 1 − layer), no weight
        decay on 1-D tensors (the original's get_parameter_groups)."""
        depth, groups = self.backbone.vision_depth, {}
        for name, p in self.live_tensors().items():
            layer = layer_of(name, depth)
            # the original's mask token is [1, 1, W], so it is decayed like the matrices
            flat = p.dim() == 1 and name != "mask_token"
            key = f"layer{layer}" + ("_no_decay" if flat else "")
            if key not in groups:
                groups[key] = ParamGroup([], lr_scale=self.config.layer_decay ** (depth + 1 - layer),
                                         weight_decay_scale=0.0 if flat else 1.0)
            groups[key].params.append(p)
        return groups

    def backbone_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.visual}


def check_mask_geometry(size: int, mask_patch: int, patch: int) -> None:
    """Mask blocks must tile the image and be whole model patches."""
    if size % mask_patch or mask_patch % patch:
        raise ValueError(f"method.mask_patch={mask_patch} must divide the {size}-pixel images and be a multiple of "
                         f"the model's {patch}-pixel patch; e.g. method.mask_patch={2 * patch} (the original: 32 "
                         "pixels = 2 patches of ViT-B/16 at 224)")


@dataclass
class MUSTLoRAConfig(MUSTConfig):
    # the PEFT variant: LoRA on the image tower's attention instead of every tower weight, with
    # CLIP-LoRA's placement and scaling (adapt/methods/lora.py) but no dropout (MUST has none, and
    # the teacher must see what the student is)
    towers: list[str] = field(default_factory=lambda: ["image"])
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    layers: Optional[list[int]] = None
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.0
    rslora: bool = True
    dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if list(self.towers) != ["image"] or self.r < 1 or self.dropout != 0:
            raise ValueError("must_lora adapts the image tower (towers: [image]) with r >= 1 and dropout 0 "
                             f"(its teacher runs the same layers); got towers {list(self.towers)}, r {self.r}, "
                             f"dropout {self.dropout}")


@register_method("must_lora")
class MUSTLoRA(MUST):
    """MUST with LoRA updates on the image tower's q, k, v in place of full fine-tuning (a stated
    departure from the original): the classifier, mask token, ln_patch and decoder train as in
    ``must``, and the EMA teacher averages the LoRA factors with them."""

    Config = MUSTLoRAConfig
    trainable_kind = "image-tower LoRA + classifier (EMA self-training)"

    def tune_backbone(self) -> list[str]:
        from adapt.methods.lora import add_lora

        _, names = add_lora(self.backbone, self.config)
        return names
