"""CLIPPR (Kahana, Cohen & Hoshen, 2022, "Improving Zero-Shot Models with Label Distribution
Priors"; jonkahana/CLIPPR, train__distr_match__classification.py and model.py): an MLP head on
CLIP's normalized image feature, trained on unlabelled images to agree with the frozen zero-shot
model while its mean prediction matches a prior over the labels.

    h(u) = W₃ · LReLU([BN] W₂ · LReLU([BN] W₁ u + b₁) + b₂),  u = normalize(f(x)),  d → 128 → 128 → C
    L    = CE(h(u), ŷ) + α · KL(π ‖ p̄),   ŷ = argmax_c cos(f(x), t_c)   (hard, per batch)

``t_c`` is the prompt ``a photo of a {}`` without ensembling; p̄ the mean of batch-mean softmax
over a window (``adapt/methods/priors.py``); π the prior of ``data.unlabelled.prior``
(``uniform`` or a {class: share} file). Predictions are argmax h(u). Defaults are the original's
CIFAR-10 script (bash_scripts/cifar10/clippr__uniform_prior.sh): α 100, Adam lr 1e-3, wd 3e-4,
batch 128 with 4 accumulated batches, 70 epochs, stages 10 / 10, the lr ×0.3 every 10 epochs,
no BatchNorm (the ImageNet head has it: ``batch_norm``), recipes/clippr/.

Stages. Epochs < ``stage1_epochs`` train the head at the recipe's lr; the next ``stage2_epochs``
train only the CLIP image tower at 1e-6 (``stage2_lr_scale`` × lr); the rest the head at 1e-4
(``stage3_lr_scale``); in each stage the lr restarts and falls by ``step_gamma`` every
``step_epochs``. Switching is per epoch through ``Method.lr_factor`` (a group at 0 sits out) and
``on_train_epoch_start`` (the stage, right after a resume too); the engine has no branch for it.
``clippr`` is the head alone (stage 2 off, ``stage2_epochs: 0``), on cached frozen features;
``clippr_ft`` adds stage 2 (the original's default, 10 epochs) and declares
``changes_backbone``. They are two registered names, not one config switch, because what a
method declares (the feature cache, changing the backbone) is a class property that the data
module and the runner read before any config is applied.

Departures (each a fix or a choice, never silent):
- The original's CIFAR10 "test" set is its training set (``torchvision CIFAR10(train='test')``:
  a non-empty string is true); adapt evaluates on the real test split.
- It feeds CLIP ImageNet's mean / std, and its ImageNet test transform flips at random; adapt
  uses the backbone's own normalisation and a deterministic test transform.
- Without a prior it takes the training labels' frequencies (labels used); adapt requires a prior
  (``requires_data``) and never reads a training label.
- Checkpoint 'best' is the lowest unsupervised loss on the test set; adapt keeps the last epoch
  (the ImageNet script's choice): no test image selects anything.
- Accumulation: the original steps on batch groups {0}, {1..4}, {5..8}, … (``batch_idx % 4 == 0``)
  with loss mean CE + α·KL(π ‖ mean of the group's batch means). For equal batches that is exactly
  one step on their union, so the recipes say ``data.batch_size: 512`` (128 × 4) with ``window: 1``;
  the lone first batch and the short last group are not reproduced. ``window: 300`` is the
  ImageNet FIFO of batch means (one step per batch). Lightning's ``accumulate_grad_batches`` would
  sum per-batch KLs instead: leave it at 1.
- Its StepLR counts ``len(loader)·10/4`` optimizer steps, a float that makes CIFAR-10's decay
  fall every ~20 epochs; adapt decays every ``step_epochs`` as the flag says.
- One Adam for the whole run: its moments carry across stages (the original builds a new Adam at
  each stage); the lr of every stage is the original's. The FIFO restarts uniform on resume.
- The prior may give a class 0 (the original's ``target·log(target/pred)`` is NaN there), and a
  prior file is refused unless its shares sum to one (the original divides by their sum).
- ViT-B/32 was hard-coded; any open_clip backbone works, the head's input is its ``embed_dim``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.data.class_text import normalised
from adapt.methods.base import Method, MethodOutput, ParamGroup, as_output, check_templates
from adapt.methods.priors import BatchMeanWindow, as_prior, batch_mean_probs, prior_kl
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@dataclass
class CLIPPRConfig:
    alpha: float = 100.0  # weight of KL(π ‖ p̄) (--alpha)
    hidden: int = 128  # width of the head's two hidden layers
    batch_norm: bool = False  # BatchNorm after each hidden layer (the original's ImageNet head)
    # batches in p̄'s FIFO: 1 = the (global) batch's own mean (CIFAR-10: 128 × 4 as one batch of
    # 512); ImageNet: 300 (--acc-batches with --acc-batches-over-time)
    window: int = 1
    stage1_epochs: int = 10  # head at the recipe's lr
    stage2_epochs: int = 0  # the image tower alone (clippr_ft: 10); clippr has none
    stage2_lr_scale: float = 1e-3  # the tower's lr / optim.lr (1e-6 / 1e-3)
    stage3_lr_scale: float = 0.1  # the head's lr after stage 2 / optim.lr (1e-4 / 1e-3)
    step_epochs: int = 10  # --scheduler-epochs: the lr falls every this many epochs of a stage
    step_gamma: float = 0.3  # --scheduler-gamma
    # the zero-shot teacher's prompt (the original's PROMPTS['cifar10'], no ensembling);
    # null = the dataset's first template
    templates: Optional[list[str]] = field(default_factory=lambda: ["a photo of a {}"])

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.hidden < 1 or self.window < 1:
            raise ValueError(f"alpha must be >= 0, hidden and window >= 1; got {self.alpha}, "
                             f"{self.hidden}, {self.window}")
        if min(self.stage1_epochs, self.stage2_epochs) < 0 or self.step_epochs < 1 or not 0 < self.step_gamma <= 1:
            raise ValueError("stage1_epochs / stage2_epochs must be >= 0, step_epochs >= 1, step_gamma in (0, 1]")
        check_templates(self.templates)


@register_method("clippr")
class CLIPPR(Method):
    """CLIPPR: an MLP head on frozen CLIP features trained on unlabelled images (CE to the zero-shot
    argmax + α·KL(prior ‖ mean prediction))."""

    Config = CLIPPRConfig
    trainable_kind = "MLP head (unlabelled + prior)"
    supports_feature_cache = True
    repointable = False  # one output row per training class
    learns_unlabelled = True
    per_task_loss = False  # the prior's KL reads every class's mean probability
    requires_data = {"unlabelled.prior": 'the label prior: "uniform" or a JSON file {class: share}'}

    def __init__(self, config: CLIPPRConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.check_stages()
        d, h, n = backbone.embed_dim, config.hidden, len(self.classnames)
        norm = (lambda: nn.BatchNorm1d(h)) if config.batch_norm else nn.Identity
        self.head = nn.Sequential(nn.Linear(d, h), norm(), nn.LeakyReLU(), nn.Linear(h, h), norm(),
                                  nn.LeakyReLU(), nn.Linear(h, n, bias=False)).to(backbone.logit_scale.device)
        # data, not learned: set from the data module in ``setup``, never saved
        self.register_buffer("prior", torch.full((n,), 1.0 / n), persistent=False)
        self.window = BatchMeanWindow(config.window, n)
        self.epoch = 0
        self.rebuild_classes()

    def check_stages(self) -> None:
        if self.config.stage2_epochs:
            raise ValueError("clippr trains the head on frozen features; its stage 2 (fine-tuning the image "
                             "tower) is method.name=clippr_ft, or set method.stage2_epochs=0")

    def rebuild_classes(self) -> None:
        # the zero-shot teacher's classifier, per class list, never saved
        self.register_buffer("teacher_text", self.hand_written_text_features(), persistent=False)

    def setup(self, datamodule) -> None:
        shares = getattr(datamodule, "label_prior", None)
        if shares is None:  # a recipe cannot get here (requires_data); a direct caller gets uniform
            log.info("clippr: the data gives no label prior; matching the uniform one")
        else:
            by_name = dict(zip((normalised(c) for c in datamodule.train_classnames), shares))
            missing = [c for c in self.classnames if normalised(c) not in by_name]
            if missing:
                raise ValueError(f"clippr: the label prior has no share for {missing[:5]}")
            self.prior = as_prior([by_name[normalised(c)] for c in self.classnames],
                                  len(self.classnames)).to(self.prior.device)
        self.window.reset()

    # ------------------------------------------------------------------ forward ----------------
    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.head(image_features.to(self.head[0].weight.dtype))

    def teacher_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Normalized image features of the frozen zero-shot model (here: the head's input)."""
        return features

    def pseudo_labels(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """The zero-shot model's argmax, recomputed for every batch (CLIPPR's ``predict__eval``)."""
        with torch.no_grad():
            return self.backbone.logits(teacher_features, self.teacher_text).argmax(dim=-1)

    def output(self, x: torch.Tensor) -> MethodOutput:
        features = self.image_features_of(x)
        pseudo = self.pseudo_labels(self.teacher_features(x, features))
        return MethodOutput(self.forward_features(features), tensors={"pseudo_labels": pseudo})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        """CE to the zero-shot pseudo-labels + α·KL(π ‖ p̄); ``labels`` are never read (-1 for
        unlabelled data)."""
        out = as_output(out)
        if "pseudo_labels" not in out.tensors:
            raise ValueError("clippr's loss needs the pseudo-labels of its output(): pass output(x), not logits")
        ce = F.cross_entropy(out.logits, out.tensors["pseudo_labels"])
        kl = prior_kl(self.prior, self.window.push(batch_mean_probs(out.logits)))
        out.scalars.update(ce=ce.detach(), prior_kl=kl.detach(),
                           agreement=(out.logits.argmax(-1) == out.tensors["pseudo_labels"]).float().mean())
        # α = 0 is CE alone, exactly (0 · a non-finite KL would not be 0)
        return ce + self.config.alpha * kl if self.config.alpha else ce

    # ------------------------------------------------------------------ stages -----------------
    def stage_of(self, epoch: int) -> tuple[int, int]:
        """(stage 1 / 2 / 3, epochs since the stage began)."""
        s1, s2 = self.config.stage1_epochs, self.config.stage2_epochs
        if epoch < s1:
            return 1, epoch
        return (2, epoch - s1) if epoch < s1 + s2 else (3, epoch - s1 - s2)

    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self.epoch = epoch

    def lr_factor(self, group: str, epoch: int) -> float:
        stage, into = self.stage_of(epoch)
        decay = self.config.step_gamma ** (into // self.config.step_epochs)  # a fresh StepLR per stage
        if group == "head":
            return 0.0 if stage == 2 else decay * (self.config.stage3_lr_scale if stage == 3 else 1.0)
        return decay if stage == 2 else 0.0  # the image tower trains in stage 2 only

    def param_groups(self) -> dict[str, ParamGroup]:
        return {"head": ParamGroup(list(self.head.parameters()))}


@dataclass
class CLIPPRFineTuneConfig(CLIPPRConfig):
    stage2_epochs: int = 10  # the original's --stage2-length


@register_method("clippr_ft")
class CLIPPRFineTune(CLIPPR):
    """CLIPPR with its stage 2: between the head's stages the CLIP image tower alone is fine-tuned
    at 1e-6 (the original's default schedule); the zero-shot teacher stays the frozen model."""

    Config = CLIPPRFineTuneConfig
    trainable_kind = "MLP head + image tower (stage 2)"
    supports_feature_cache = False
    changes_backbone = True

    def __init__(self, config: CLIPPRFineTuneConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        # the teacher: the untouched model this method was given (frozen, shared, never saved)
        self.teacher = backbone
        self.visual = [n for n, _ in self.backbone.named_parameters() if n.startswith("model.visual.")]
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in self.visual)

    def check_stages(self) -> None:
        if self.config.stage2_epochs < 1:
            raise ValueError("clippr_ft fine-tunes the image tower in stage 2: set method.stage2_epochs >= 1 "
                             "(the original: 10), or use method.name=clippr for the head alone")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        # the tower's graph only in stage 2 (the original's freeze_backbone runs it under no_grad)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage_of(self.epoch)[0] == 2):
            return self.backbone.encode_image(images, normalize=False)

    def teacher_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher.encode_image(x, normalize=True)

    def param_groups(self) -> dict[str, ParamGroup]:
        params = dict(self.backbone.named_parameters())
        return {"head": ParamGroup(list(self.head.parameters())),
                "image_tower": ParamGroup([params[n] for n in self.visual], lr_scale=self.config.stage2_lr_scale)}

    def backbone_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.visual}

    def transform_gradients(self, reduce) -> None:
        # stage 2 steps the tower alone, as the original's stage-2 optimizer holds only it: the
        # head's gradient is dropped so that Adam neither moves it nor updates its moments
        if self.stage_of(self.epoch)[0] == 2:
            for p in self.head.parameters():
                p.grad = None
