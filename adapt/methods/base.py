"""The method API: every adaptation method is an ``nn.Module`` built from (config, backbone, classes).

A method owns every trainable parameter and maps a batch to logits. Training mechanics
(optimizer, schedule, precision, devices, checkpoints, logging) belong to the engine.
Hooks have do-nothing defaults so a method overrides only what defines it.

A batch is images [B, 3, H, W], or, for a method that declares ``supports_feature_cache``, the
frozen encoder's image features [B, d] as the data module serves them from the feature cache
(unnormalized, as ``encode_images`` returns them); for a method with ``dense_inputs`` they are its
dense outputs packed [B, T, d]. ``forward`` tells them apart by their rank,
so neither the engine nor the runner ever needs to know which one it is passing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from adapt.backbone import ClipBackbone
from adapt.dense import DenseImage, pack_dense, unpack_dense
from adapt.methods.class_text import class_text_features, text_feature_mean, zero_shot_text_features  # noqa: F401
from adapt.methods.class_items import items_of_classes, items_of_every_class  # noqa: F401
from adapt.data.class_text import ClassText
from adapt.data.items import clean_classname
from adapt.tasks import Task
from adapt.tasks.single_label import SingleLabel


@dataclass
class MethodOutput:
    """What a training forward produced: the logits, the named tensors the method's loss reads
    (KgCoOp's text features, PromptSRC's frozen features), and named scalars (loss terms) that
    the engine logs as ``train/<name>`` and the runner writes to ``results.json``."""

    logits: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Union[float, torch.Tensor]] = field(default_factory=dict)


@dataclass
class ParamGroup:
    """Trainable parameters the optimizer treats alike: their lr and weight decay are the
    recipe's times these multipliers (LASP: the image tower's LayerNorms at 0.1x the prompt's
    lr); a recipe may override them (``optim.groups.<name>.lr_scale``). ``warmup_epochs``: the
    group's own constant warm-up before the schedule (CAVPT's CoOp context warms up for 1 epoch,
    its visual prompts for 10); None = the recipe's ``optim.warmup_epochs``."""

    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0
    warmup_epochs: Optional[int] = None


def as_output(out: Union[MethodOutput, torch.Tensor]) -> MethodOutput:
    """Loss hooks accept bare logits too (then only what they can recompute is available)."""
    return out if isinstance(out, MethodOutput) else MethodOutput(out)


class Method(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type]
    # True when ``forward_features`` is valid on frozen image features, so the data module may
    # serve cached features instead of images (CoOp, CoCoOp, feature adapters).
    supports_feature_cache: ClassVar[bool] = False
    # The dense outputs of the image tower the method reads (any of "pooled", "tokens",
    # "value": ``adapt/dense.py``); then its frozen image input is those, packed [B, T, d], and a
    # feature cache stores them in place of the pooled feature. Read with ``dense_features_of``.
    dense_inputs: ClassVar[tuple[str, ...]] = ()
    # The task kinds (``adapt/tasks/``) it can learn and predict; a recipe pairing it with other
    # data is refused before anything loads. ``self.task`` is the one it was built for; the
    # default ``loss`` is that task's.
    tasks: ClassVar[tuple[str, ...]] = ("single_label",)
    # ``data`` fields the method cannot do without, each with what to give (ProTeCt's class
    # tree); a recipe without them is refused before anything loads
    requires_data: ClassVar[dict[str, str]] = {}
    # True for methods that make their own training targets and never read the labels (CLIPPR's
    # online zero-shot pseudo-labels): only they run on data whose labels are all hidden
    # (``Setting.check_method``: data.setting=unsupervised with shots 0)
    learns_unlabelled: ClassVar[bool] = False
    # False for methods whose loss compares the logits with another distribution over all the
    # classes (PromptSRC's KL to the frozen model, CLIPPR's prior): with multi_task's per_task
    # classifier the classes outside an image's task are -inf and that term is not finite, so
    # such a method is refused there (the contract test finds the ones that must say False)
    per_task_loss: ClassVar[bool] = True
    task: Task = SingleLabel()
    # ``forward_features`` receives L2-normalized image features (CLIP's convention); False for
    # methods that read the encoder's raw output (CLIP-Adapter's blend, the linear probe).
    normalize_features: ClassVar[bool] = True
    # Whether a new class list can be set after training (False for class-specific parameters),
    # and the setting that would make it so (named in the error when novel classes are needed).
    repointable: ClassVar[bool] = True
    # True when a class's logit depends on which other classes are in the list (CALIP's softmax
    # over the classes): re-pointed, such a method only permutes columns for a reordered list.
    couples_classes: ClassVar[bool] = False
    repoint_fix: ClassVar[str] = ""
    # True for test-time methods that take gradient steps while evaluating (TPT).
    grad_at_test: ClassVar[bool] = False
    # what it learns, in a few words, for `adapt methods` ("text context", "vision prompts", ...)
    trainable_kind: ClassVar[str] = ""
    # How a test-time method carries state over the test set: "episodic" (adapts to each image
    # alone and forgets it: TPT, Zero) or "online" (a memory grows along the test stream: TDA,
    # DMN). The engine resets episodic state after every image and online state at the start
    # of every evaluation set, feeds online methods a seeded order and refuses them under DDP.
    test_time: ClassVar[str] = ""
    # True for methods that change the backbone's weights or modules (LoRA, LayerNorm / bias
    # tuning, WiSE-FT). Such a method works on its own clone of the backbone it is given, so
    # nothing it changes reaches another model in the process (the zero-shot baseline, the
    # export check); its image features keep their graph (no frozen-feature cache), and the
    # backbone tensors it owns are named by ``backbone_state``.
    changes_backbone: ClassVar[bool] = False
    # True for methods whose classifier (or anchor) is built by ``hand_written_text_features``:
    # they take any class text (``data.class_text``: description sentences, descriptor phrases);
    # a recipe giving class text to another method is refused before anything loads
    takes_class_text: ClassVar[bool] = False
    # What a training batch holds: "images" (images, or their cached features: see above) or
    # "captions" (token ids [B, L] of the data's caption stream, ``data.captions``: TaI-DPT; an
    # integer tensor, told from images and features by its dtype). Evaluation reads images.
    trains_on: ClassVar[str] = "images"

    def __init__(self, config, backbone: ClipBackbone, classnames: Sequence[str], templates: Sequence[str]):
        super().__init__()
        self.config = config
        self.backbone = backbone.clone() if self.changes_backbone else backbone
        self.classnames = [clean_classname(c) for c in classnames]
        self.templates = list(templates) or ["a photo of a {}."]
        self.class_text: Optional[ClassText] = None  # set by ``use_class_text``
        # the task (dataset) of every class when several are trained at once (multi_task), set
        # with the classes by ``set_classnames``; None: one task
        self.class_tasks: Optional[list[str]] = None
        self._text_cache: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ forward ----------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of images or of frozen image features (see the module docstring)."""
        return self.forward_features(self.image_features_of(x))

    def output(self, x: torch.Tensor) -> MethodOutput:
        """The training forward: logits plus whatever the loss needs. Methods whose loss reads
        more than the logits override this."""
        return MethodOutput(self(x))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalized image features: frozen ones (what the feature cache stores), or, for a
        method that changes the backbone, through its weights with their graph. A method with
        ``dense_inputs`` gets them packed [B, T, d]."""
        with contextlib.nullcontext() if self.changes_backbone else torch.no_grad():
            if self.dense_inputs:
                dense = self.backbone.encode_image_dense(images, outputs=self.dense_inputs, normalize=False)
                return pack_dense(dense, self.dense_inputs)
            return self.backbone.encode_image(images, normalize=False)

    def dense_features_of(self, x: torch.Tensor) -> DenseImage:
        """The ``dense_inputs`` of images or of their cached packed form, L2-normalized when the
        method reads normalized features."""
        dense = unpack_dense(x if is_features(x) else self.encode_images(x), self.dense_inputs)
        if self.normalize_features:
            for name in self.dense_inputs:
                setattr(dense, name, F.normalize(getattr(dense, name), dim=-1))
        return dense

    def image_features_of(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen image features ``forward_features`` expects, from images or cached features."""
        feats = x if is_features(x) else self.encode_images(x)
        return F.normalize(feats, dim=-1) if self.normalize_features else feats

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward or forward_features")

    @property
    def inference_mode_ok(self) -> bool:
        """Whether evaluation may run under torch's inference mode: not for methods that need
        gradients at test time (TPT), nor for test-time state, which must stay ordinary tensors
        (inference tensors refuse later in-place updates)."""
        return not (self.grad_at_test or self.test_time)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits; test-time methods (TPT) override this to adapt per sample."""
        return self(x)

    # ------------------------------------------------------------------ hooks ------------------
    def loss(self, out: Union[MethodOutput, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch from ``output``'s result; methods add regularizers here
        (KgCoOp, PromptSRC) and may record their terms in ``out.scalars``. The default is the
        task's loss (cross-entropy for single-label data)."""
        return self.task.loss(as_output(out).logits, labels)

    def scalars(self) -> dict[str, float]:
        """Named values describing the fitted method (Tip-Adapter's chosen α/β, CLIP-Adapter's
        ratio); they reach the training log and ``results.json``."""
        return {}

    def transform_gradients(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Rewrite the trainable parameters' ``.grad`` before the optimizer step (ProGrad's
        projection); the default changes nothing. The engine calls it once per optimizer step,
        on the gradient that step will use: accumulated over ``accumulate_grad_batches``,
        averaged over the DDP processes, unscaled under fp16 mixed precision; before gradient
        clipping and before the optimizer adds weight decay (as in the originals, whose SGD adds
        it inside ``step``). ``reduce`` averages a tensor over the processes (the identity on one):
        a gradient the method took itself with ``torch.autograd.grad`` is its process's own and
        goes through ``reduce`` before it is compared with ``.grad``."""

    def on_optimizer_step(self, step: int) -> None:
        """Called right after every optimizer step; ``step`` counts the steps taken before this
        one over the whole run (0 for the first, the resumed count after a resume), so state that
        follows the step (MUST's EMA teacher and its decay ramp) is right however the run
        started. The default does nothing."""

    def train_transform(self, image_size: int, mean, std) -> Optional[Callable]:
        """The method's own training transform of a PIL image, replacing the data's augmentation
        (MUST's weak and strong views of each image, stacked [2, 3, H, W]), or None: the data's.
        Evaluation always reads the data's test transform."""
        return None

    def setup(self, datamodule) -> None:
        """Called once before fitting/evaluating with the data (Tip-Adapter's cache, UPL labels)."""

    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        """Called before every training epoch, the first one after a resume included, so that
        state which follows from the epoch number (CLIPPR's stage) is right however the run
        started."""

    def on_train_epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Called after every training epoch (PromptSRC's weight averaging)."""

    def lr_factor(self, group: str, epoch: int) -> float:
        """The method's own multiplier on parameter group ``group``'s lr in ``epoch`` (0-based),
        on top of the recipe's schedule; 0 keeps the group still that epoch (CLIPPR's stages:
        the head, then the image tower, then the head again). The default is 1 throughout."""
        return 1.0

    def on_fit_end(self) -> None:
        """Called after training (WiSE-FT's weight interpolation)."""

    def evaluation_sweep(self):
        """A setting the runner should also evaluate at several values after fitting, reported
        in ``results.json`` beside the chosen one: ``(name, values, apply(value), chosen)``
        (WiSE-FT's mixing coefficient α), or None."""
        return None

    def set_classnames(self, classnames: Sequence[str], tasks: Optional[Sequence[str]] = None) -> None:
        """Re-point the classifier at new class names (novel classes, exported adapters);
        ``tasks``: the task of each (multi_task; None: one task)."""
        names = [clean_classname(c) for c in classnames]
        if tasks is not None and len(tasks) != len(names):
            raise ValueError(f"{len(tasks)} task names for {len(names)} classes")
        if not self.repointable and names != self.classnames:
            fix = f" (with {self.repoint_fix} it can)" if self.repoint_fix else ""
            raise ValueError(
                f"{self.name} with this config learns per-class parameters for its "
                f"{len(self.classnames)} training classes ({', '.join(self.classnames[:4])}, ...) and "
                f"cannot classify other class names ({len(names)} given){fix}")
        self.classnames = names
        self.class_tasks = list(tasks) if tasks is not None else None
        self._text_cache = None
        self.rebuild_classes()

    def use_class_text(self, class_text: Optional[ClassText]) -> None:
        """Build the hand-written classifier from ``class_text`` (descriptions, descriptors; None:
        the templates alone) from now on."""
        if class_text is not None and not self.takes_class_text:
            raise ValueError(f"{self.name} does not build its classifier from hand-written class text")
        self.class_text = class_text
        self._text_cache = None
        self.rebuild_classes()

    def names_not_scored_alone(self) -> str:
        """Why a name's logit would not be the one the method gives that name pointed at it
        alone (a class-specific classifier, a softmax over the list, test-time adaptation to
        the list), in a few words; "" when each column depends only on its own name, so that
        a subset of the columns is the method pointed at that subset (hierarchical metrics)."""
        if not self.repointable:
            return "learns one thing per training class"
        if self.couples_classes:
            return "scores each class against the others in its list"
        if self.test_time or self.grad_at_test:
            return "adapts at test time to the classes it is given"
        return ""

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

    def param_groups(self) -> dict[str, ParamGroup]:
        """The trainable parameters by named group, each exactly once; one group at the recipe's
        lr unless the method's original trains some at their own rate."""
        return {"params": ParamGroup(self.trainable_parameters())}

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone tensors this method owns, by their names under ``backbone`` (LoRA's
        factors, the tuned norms or biases, WiSE-FT's fine-tuned image tower): exactly what of
        the backbone it trains and saves. Empty for methods that leave the backbone frozen."""
        return {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What export and checkpoints save: trainable parameters and persistent buffers of the
        method outside the backbone, and the backbone tensors it names in ``backbone_state``.
        Buffers derived from class names are registered non-persistent."""
        state = {n: p.detach() for n, p in self.named_parameters()
                 if p.requires_grad and not n.startswith("backbone.")}
        persistent = self.state_dict(keep_vars=True)
        state.update({n: b.detach() for n, b in self.named_buffers()
                      if not n.startswith("backbone.") and n in persistent})
        state.update({"backbone." + n: t.detach() for n, t in self.backbone_state().items()})
        return state

    def export_files(self) -> dict[str, bytes]:
        """Extra files an adapter carries beside adapt's own (a peft adapter for LoRA), by path
        inside the adapter folder."""
        return {}

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

    def hand_written_text_features(self, raw: bool = False, track_grad: bool = False) -> torch.Tensor:
        """Zero-shot text features [C, d] of the current classes under ``hand_written_templates``
        and the run's class text (``adapt/methods/class_text.py``); ``raw``: the unnormalized mean
        of unnormalized prompt features (the initial classifier of TaskRes and CLAP's ZS-LP, whose
        magnitude sets the scale of what is learned on it); ``track_grad``: keep the graph."""
        templates = self.hand_written_templates()
        if self.class_text is not None:
            return class_text_features(self.backbone, self.classnames, templates, self.class_text,
                                       normalize_each=not raw, normalize_mean=not raw, track_grad=track_grad)
        if raw or track_grad:
            return text_feature_mean(self.backbone, self.classnames, templates, normalize_each=not raw,
                                     normalize_mean=not raw, track_grad=track_grad)
        return zero_shot_text_features(self.backbone, self.classnames, templates)


class HandWrittenClassifier(Method):
    """A method that classifies with the frozen hand-written prompts' text features (zero-shot,
    VP, VPT, Tip-Adapter, the feature adapters): ``self.text_features`` [C, d], rebuilt for every
    class list and never saved."""

    takes_class_text = True

    def rebuild_classes(self) -> None:
        self.register_buffer("text_features", self.hand_written_text_features(), persistent=False)


class HandWrittenAnchor(Method):
    """A mixin for methods that also read the frozen hand-written prompts' text features beside
    what they learn (KgCoOp's anchor, ProGrad's zero-shot teacher): ``handcrafted()`` [C, d],
    computed the first time it is needed for each class list, never trained or saved."""

    takes_class_text = True

    def rebuild_classes(self) -> None:
        super().rebuild_classes()
        # derived from the class names: non-persistent, recomputed for a new class list
        self.register_buffer("handcrafted_features", None, persistent=False)

    def handcrafted(self) -> torch.Tensor:
        """Frozen text features [C, d] of the hand-written prompts of the current classes."""
        if self.handcrafted_features is None:
            self.register_buffer("handcrafted_features", self.hand_written_text_features(), persistent=False)
        return self.handcrafted_features


def is_features(x: torch.Tensor) -> bool:
    """A batch of image features [B, d] (or packed dense ones [B, T, d]) rather than images
    [B, 3, H, W]."""
    return x.dim() in (2, 3)


def check_templates(templates: Optional[Sequence[str]], key: str = "templates") -> None:
    """For Configs with a templates field: each needs a ``{}`` for the class name."""
    if templates is not None and not all("{}" in t for t in templates):
        raise ValueError(f"every template of {key} needs a '{{}}' for the class name, got {list(templates)}")


def check_crop_scale(scale: Sequence[float]) -> None:
    """A random-resized-crop area range ``[lo, hi]`` with ``0 < lo <= hi <= 1``."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(scale)}")
