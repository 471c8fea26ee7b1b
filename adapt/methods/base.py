"""The method API: every adaptation method is an ``nn.Module`` built from (config, backbone, classes).

A method owns every trainable parameter and maps a batch to logits. Training mechanics
(optimizer, schedule, precision, devices, checkpoints, logging) belong to the engine.
Hooks have do-nothing defaults so a method overrides only what defines it.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.backbone import ClipBackbone


class Method(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type]
    # True when ``forward_features`` is valid on frozen image features, so the engine may feed
    # cached features instead of images (CoOp, CoCoOp, feature adapters).
    supports_feature_cache: ClassVar[bool] = False
    # Whether a new class list can be set after training (False for class-specific parameters),
    # and the setting that would make it so (named in the error when novel classes are needed).
    repointable: ClassVar[bool] = True
    repoint_fix: ClassVar[str] = ""
    # True for test-time methods that take gradient steps while evaluating (TPT).
    grad_at_test: ClassVar[bool] = False
    # How a test-time method carries state over the test set: "episodic" (adapts to each image
    # alone and forgets it: TPT, Zero) or "online" (a memory grows along the test stream: TDA,
    # DMN). The engine resets episodic state after every image and online state at the start
    # of every evaluation set, feeds online methods a seeded order and refuses them under DDP.
    test_time: ClassVar[str] = ""

    def __init__(self, config, backbone: ClipBackbone, classnames: Sequence[str], templates: Sequence[str]):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.templates = list(templates) or ["a photo of a {}."]
        self._text_cache: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ forward ----------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.encode_images(images))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen, normalized image features (what the feature cache stores)."""
        with torch.no_grad():
            return self.backbone.encode_image(images)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward or forward_features")

    def predict(self, x: torch.Tensor, inputs: str = "images") -> torch.Tensor:
        """Evaluation logits; test-time methods (TPT) override this to adapt per sample."""
        return self.forward_features(x) if inputs == "features" else self(x)

    # ------------------------------------------------------------------ hooks ------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch; methods add regularizers here (KgCoOp, PromptSRC)."""
        return F.cross_entropy(logits, labels)

    def setup(self, datamodule) -> None:
        """Called once before fitting/evaluating with the data (Tip-Adapter's cache, UPL labels)."""

    def on_train_epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Called after every training epoch (PromptSRC's weight averaging)."""

    def on_fit_end(self) -> None:
        """Called after training (WiSE-FT's weight interpolation)."""

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-point the classifier at new class names (novel classes, exported adapters)."""
        if not self.repointable and len(classnames) != len(self.classnames):
            raise ValueError(
                f"{self.name} with this config learns per-class parameters for "
                f"{len(self.classnames)} classes and cannot be applied to {len(classnames)} other ones")
        self.classnames = [c.replace("_", " ") for c in classnames]
        self._text_cache = None
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        """Rebuild whatever depends on ``self.classnames`` (tokenized prompts, classifiers)."""

    def reset_test_state(self) -> None:
        """Forget what test-time adaptation has gathered (an online memory, per-image state)."""

    # ------------------------------------------------------------------ state ------------------
    @property
    def is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What export and checkpoints save: trainable parameters and persistent buffers outside
        the frozen backbone. Buffers derived from class names are registered non-persistent."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        persistent = self.state_dict(keep_vars=True)
        state.update({n: b.detach() for n, b in self.named_buffers()
                      if not n.startswith("backbone.") and n in persistent})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"{self.name} state mismatch: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        with torch.no_grad():
            for name, value in state.items():
                target = own[name]
                if target.shape != value.shape:
                    raise ValueError(f"{self.name}: {name} has shape {tuple(value.shape)} in the "
                                     f"saved state but {tuple(target.shape)} here (other class "
                                     "list, backbone or config?)")
                target.copy_(value)
        self._text_cache = None

    # ------------------------------------------------------------------ evaluation cache -------
    def cached_text_features(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Class text features, computed once per evaluation when nothing can change them.

        In training (or with grad enabled) they are recomputed every call; the cache is dropped
        whenever the module switches mode, its state is loaded, or its classes change."""
        if self.training or torch.is_grad_enabled():
            return compute()
        if self._text_cache is None:
            self._text_cache = compute()
        return self._text_cache

    def train(self, mode: bool = True):
        self._text_cache = None
        return super().train(mode)

    # ------------------------------------------------------------------ hand-written prompts ---
    def hand_written_templates(self) -> list[str]:
        """The templates of this method's hand-written classifier (or anchor): the Config's own
        ``templates`` when it has and sets them, else the dataset's first template, or all of
        them when the Config's ``ensemble`` is true."""
        own = getattr(self.config, "templates", None)
        if own:
            return list(own)
        return self.templates if getattr(self.config, "ensemble", False) else self.templates[:1]

    def hand_written_text_features(self) -> torch.Tensor:
        """Zero-shot text features [C, d] of the current classes under ``hand_written_templates``."""
        return zero_shot_text_features(self.backbone, self.classnames, self.hand_written_templates())


def check_templates(templates: Optional[Sequence[str]]) -> None:
    """For Configs with a ``templates`` field: each needs a ``{}`` for the class name."""
    if templates is not None and not all("{}" in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' for the class name, got {list(templates)}")


def zero_shot_text_features(backbone: ClipBackbone, classnames: Sequence[str],
                            templates: Sequence[str]) -> torch.Tensor:
    """The zero-shot classifier: per class, the renormalized mean of its normalized template
    embeddings (a single template gives that template's embedding)."""
    with torch.no_grad():
        per_template = []
        for template in templates:
            tokens = backbone.tokenize([template.format(c) for c in classnames])
            per_template.append(backbone.encode_text(tokens))
        mean = torch.stack(per_template).mean(dim=0)
        return F.normalize(mean, dim=-1)
