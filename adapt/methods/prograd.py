"""ProGrad (Zhu et al., ICCV 2023): CoOp whose update never works against zero-shot CLIP's knowledge.

Two losses of the same student logits z (CoOp's): L_ce = CE(z, y), and the distillation term
L_kl = T² · mean_b Σ_c −softmax(z_zs / T)_c · log softmax(z / T)_c towards the zero-shot
teacher's logits z_zs (the dataset's hand-written prompt on the same frozen image features).
Per trainable tensor, with g_d = ∇L_ce and g_g = ∇L_kl: where g_d · g_g < 0 the step uses
g_d − λ (g_d · ĝ_g) ĝ_g (ĝ_g = g_g / ‖g_g‖), else g_d. L_kl is never added to the update: it only
names the direction not to go against. Prediction is CoOp's. g_g is taken in ``loss`` with
``torch.autograd.grad`` (the graph kept for L_ce's backward) and the projection runs in the
engine's gradient hook (``Method.transform_gradients``), on the gradient of the whole global batch.

Reference: BeierZhu/Prompt-align at 1b76203 (``ProGrad.public/trainers/prograd.py``,
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py::prograd_backward_and_update``; configs
``rn50*.yaml``: T = 1, LOSS.LAMBDA = 1, N_CTX 16, CTX_INIT True, SGD lr 0.002 / momentum 0.9 /
weight decay 5e-4, cosine, 1 warm-up epoch at 1e-5). The step is checked against that function
in ``tests/test_prograd.py`` when a checkout is at hand.

Departures, each deliberate:
- Initialisation (CTX_INIT True): the original takes its own per-dataset template
  (``CUSTOM_TEMPLATES``, class name last, e.g. "a type of pet, a photo of a {}.") with " {}."
  removed, counts its *words*, and left-pads with zero vectors to N_CTX. Here the teacher's
  template gives the text (the words before "{}"; set ``method.templates`` to the original's
  template to match it), and its *tokens* are counted: the same for templates without
  punctuation, while the original, on a template with a comma, leaves its last word as a frozen
  token after the context.
- Precision: fp32 on CPU and bf16 / fp16 autocast on GPUs (adapt's engine), where the original
  runs CLIP in fp16 (``PREC fp16``; its ``amp`` branch back-propagates a tuple and fails). Under
  fp16 autocast g_g is taken without the loss scaler; only its direction is used.
- Several processes: g_g is averaged over the DDP processes before the projection, so the step
  is the one-process step at the same global batch (the original runs on one GPU or
  DataParallel). With gradient accumulation, g_g is summed over the micro-batches as g_d is.
- A zero g_g (or g_d) leaves g_d as it is, as the original does through its 0/0 = nan test.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from adapt.methods.base import HandWrittenAnchor, MethodOutput, as_output, check_templates
from adapt.methods.coop import CoOp, CoOpConfig
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@dataclass
class ProGradConfig(CoOpConfig):
    n_ctx: Optional[int] = 16  # TRAINER.COOP.N_CTX
    # None: the teacher template's words before the class name, left-padded with zero vectors to
    # n_ctx (CTX_INIT True, the original's configs); "": random N(0, 0.02) (CTX_INIT False); or a text
    ctx_init: Optional[str] = None
    lam: float = 1.0          # λ, LOSS.LAMBDA (the README: 0.8 for 8/16 shots on Flowers, DTD, EuroSAT)
    temperature: float = 1.0  # T, LOSS.T
    # the teacher's hand-written prompt(s) instead of the dataset's first template (several are averaged)
    templates: Optional[list[str]] = None
    ensemble: bool = False
    DEFAULT_N_CTX: ClassVar[int] = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_ctx is None or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1 (the number of context vectors), got {self.n_ctx}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam (λ) must be in [0, 1]: the share of the conflicting component "
                             f"removed; got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_templates(self.templates)


@register_method("prograd")
class ProGrad(HandWrittenAnchor, CoOp):
    Config = ProGradConfig
    trainable_kind = "text context"

    def __init__(self, config: ProGradConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self._kl_grads: Optional[list[torch.Tensor]] = None  # g_g of the micro-batches since the last step
        self.steps = self.conflicts = 0

    def make_prompts(self, config: ProGradConfig, backbone) -> ContextPrompts:
        words = config.ctx_init
        if words is None:  # CTX_INIT True: the teacher's prompt before the class name
            words = self.hand_written_templates()[0].split("{}")[0].strip()
            if not words:
                log.warning("prograd: the template %r has no words before the class name; the "
                            "context starts random (set method.ctx_init)", self.hand_written_templates()[0])
        return ContextPrompts(backbone, config.n_ctx, words, config.csc, config.class_token_position,
                              len(self.classnames), config.init_std, pad_to=config.n_ctx if words else None)

    def output(self, x: torch.Tensor) -> MethodOutput:
        feats = self.image_features_of(x)
        with torch.no_grad():  # the zero-shot teacher on the same frozen image features
            teacher = self.backbone.logits(feats, self.handcrafted().to(feats))
        return MethodOutput(self.forward_features(feats), {"teacher_logits": teacher})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        if "teacher_logits" not in out.tensors:
            raise ValueError("prograd's loss needs the teacher's logits: pass it what output(x) returns")
        t = self.config.temperature
        ce = F.cross_entropy(out.logits, labels)
        soft = F.softmax(out.tensors["teacher_logits"] / t, dim=-1)
        kl = -(soft * F.log_softmax(out.logits / t, dim=-1)).sum(1).mean() * t * t
        out.scalars.update(ce=ce.detach(), kl=kl.detach())
        if self.config.lam and kl.requires_grad:  # g_g, kept for the step; the graph stays for L_ce
            params = self.trainable_parameters()
            grads = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            self._kl_grads = grads if self._kl_grads is None else [a + g for a, g in zip(self._kl_grads, grads)]
        return ce

    def transform_gradients(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        kl_grads, self._kl_grads = self._kl_grads, None
        if kl_grads is None:
            return
        self.steps += 1
        conflicted = False
        for p, g_g in zip(self.trainable_parameters(), kl_grads):
            if p.grad is None:
                continue
            g_g = reduce(g_g).flatten()
            g_d = p.grad.flatten()
            dot = torch.dot(g_d.float(), g_g.float())
            if dot < 0:  # the CE step would undo what the teacher knows: drop that component
                conflicted = True
                unit = g_g.float() / g_g.float().norm()
                p.grad.copy_((g_d.float() - self.config.lam * torch.dot(g_d.float(), unit) * unit).view_as(p.grad))
        self.conflicts += conflicted

    def scalars(self) -> dict[str, float]:
        # how often the cross-entropy gradient went against the teacher's (steps of this process)
        return {"conflict_rate": self.conflicts / self.steps} if self.steps else {}
