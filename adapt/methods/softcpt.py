"""SoftCPT (Ding et al., "Prompt Tuning with Soft Context Sharing for Vision-Language Models",
arXiv 2208.13474; kding1225/softcpt ``trainers/mtcoop.py``, the ``MTCoOp`` trainer).

Soft context sharing across tasks: a task's prompt context is generated from the task's name.

1. Each task name goes through the text tower as ``"[t_1 … t_4] <task name>."``. The four
   context vectors ``t`` are learned and shared by every task. The task feature ``g_τ`` is that
   prompt's projected EOT feature, left unnormalised as the original leaves it.
2. A linear generator ``W`` ([d, 16·D], N(0, 0.02)) maps it to the task's class context:
   ``ctx_τ = reshape(g_τ W, [16, D])``.
3. Every class of task τ reads ``"[ctx_τ] <class>."``. Its normalised text feature is scored
   against the image as CoOp scores it.

Training runs under ``data.setting: multi_task`` with ``data.multi_task.classifier: per_task``:
each image's cross-entropy is taken over its own task's classes. That equals the original's
``mutitask_loss`` (a sum over tasks of CE over their slices, divided by the batch size).
Evaluation points the model at one task's classes at a time, the original's per-task argmax.
The defaults are the README's SoftCPT-NATA:
- ``TASK_N_CTX 4``, ``TASK_CSC False``;
- ``N_CTX 16``, ``CSC False``, ``CLASS_N_CTX 0``;
- ``PG_TYPE lin``;
- ``configs/trainers/MTCoOp/vit_b16_ep50.yaml``: SGD lr 0.002, 50 epochs, cosine, one warm-up
  epoch at 1e-5, batch 32.

The image features are the frozen encoder's, so SoftCPT trains on cached features.

Deliberate departures from the original:
- fp32 by default (the original trains in fp16); mixed precision is the trainer's setting.
- Only the task-shared variant (NATA) is built. The class-aware generators (``CSC True`` with
  a ``ClassPromptLearner``; ``PG_TYPE linmean`` / ``lincls``), per-task task contexts
  (``TASK_CSC True``) and negative-class subsampling (``CLS_SAMPLE_RATE``) are not.
- Task names are the recipe's task names (``data.tasks[i].name``, default the dataset name),
  underscores read as spaces, as the original reads its ``task_name.txt``. That file and the
  authors' ``split_dk`` splits are not published; adapt uses CoOp's splits.
- Outside a multi-task run (one dataset, no task names) every class belongs to one task with an
  empty name, so the task prompt is ``"[t_1 … t_4] ."``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapt.methods.base import Method
from adapt.methods.prompts import ContextPrompts, check_context_config
from adapt.methods.registry import register_method


@dataclass
class SoftCPTConfig:
    # the classes' generated context: N_CTX vectors, class name at the end (TOKEN_POSITION end)
    n_ctx: int = 16
    # the task prompt's shared learned context (TASK_N_CTX, TASK_CTX_INIT; "" = N(0, 0.02))
    task_n_ctx: int = 4
    task_ctx_init: str = ""
    init_std: float = 0.02  # nn.init.normal_(std=0.02) of the task context and of W

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"method.n_ctx must be >= 1 (the generated context's length), got {self.n_ctx}")
        if self.task_n_ctx < 1 and not self.task_ctx_init:
            raise ValueError(f"method.task_n_ctx must be >= 1, got {self.task_n_ctx}")
        check_context_config(self.task_n_ctx, self.task_ctx_init, "end")


@register_method("softcpt")
class SoftCPT(Method):
    Config = SoftCPTConfig
    trainable_kind = "task context + context generator"
    supports_feature_cache = True

    def __init__(self, config: SoftCPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.task_prompts = ContextPrompts(self.backbone, config.task_n_ctx, config.task_ctx_init,
                                           init_std=config.init_std)
        # the classes' prompts, one set per task (rebuild_classes), take the generated context:
        # their own is never learned
        self.class_prompts = nn.ModuleList()
        width = self.backbone.text_width
        self.generator = nn.Parameter(torch.empty(self.backbone.embed_dim, config.n_ctx * width,
                                                  dtype=self.backbone.dtype).normal_(std=config.init_std))
        self.rebuild_classes()

    @property
    def task_names(self) -> list[str]:
        """The tasks of the current classes, in order of first appearance."""
        return list(dict.fromkeys(self.class_tasks or [""]))

    def rebuild_classes(self) -> None:
        self.task_prompts.build([t.replace("_", " ") for t in self.task_names])
        tasks = self.class_tasks or [""] * len(self.classnames)
        order = {t: i for i, t in enumerate(self.task_names)}
        self.register_buffer("class_task", torch.tensor([order[t] for t in tasks], dtype=torch.long),
                             persistent=False)
        # a task's classes share one context, so each task's prompts run their common prefix
        # [SOS] ctx_τ through the text tower once (ContextPrompts' shared-prefix path)
        self.class_prompts = nn.ModuleList()
        self.task_classes = []
        for t in range(len(self.task_names)):
            members = [c for c, task in enumerate(self.class_task.tolist()) if task == t]
            prompts = ContextPrompts(self.backbone, self.config.n_ctx, learned=False)
            prompts.build([self.classnames[c] for c in members])
            self.class_prompts.append(prompts)
            self.task_classes.append(members)

    def task_features(self) -> torch.Tensor:
        """g_τ [T, d]: each task prompt's projected EOT feature, not normalised."""
        return self.task_prompts.text_features(normalize=False)

    def contexts(self) -> torch.Tensor:
        """ctx_τ [T, n_ctx, D] = reshape(g_τ W)."""
        g = self.task_features()
        return (g @ self.generator.to(g.dtype)).view(g.shape[0], self.config.n_ctx, -1)

    def text_features(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            ctx = self.contexts()  # [T, n_ctx, D]
            parts = [prompts.text_features(ctx[t]) for t, prompts in enumerate(self.class_prompts)]
            order = torch.tensor([c for members in self.task_classes for c in members], device=ctx.device)
            return torch.cat(parts)[torch.argsort(order)]  # back to the class order
        return self.cached_text_features(compute)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features())
