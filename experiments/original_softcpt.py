"""The original SoftCPT model and loss, imported from a user's checkout of kding1225/softcpt.

    from experiments.original_softcpt import OriginalSoftCPT
    ref = OriginalSoftCPT("/path/to/softcpt", backbone)     # a clone at 7cab4b9 or later
    model = ref.model(tasknames, classnames_per_task)       # SoftCPT-NATA: 4 task ctx, 16 ctx, lin
    logits, _ = model(images)
    loss, _ = ref.loss(logits, multi_hot_labels)            # MTCoOp.mutitask_loss

Nothing of the original is copied or committed: ``trainers/mtcoop.py`` and its ``clip/`` are
imported from the folder the user names, Dassl stood in (``experiments/original_coop.py``, plus
the two names this trainer also imports: ``compute_accuracy_map`` and ``build_evaluator``). The
model is ``CustomCLIP`` as ``MTCoOp.build_model`` builds it with ``PREC: fp32``, on the weights
of an adapt backbone.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from experiments.original_coop import _install_dassl_stand_in, _node, clip_on, import_checkout


def _unavailable(*_a, **_k):
    raise RuntimeError("not part of the Dassl stand-in (experiments/original_softcpt.py)")


class OriginalSoftCPT:
    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        missing = [p for p in ("trainers/mtcoop.py", "clip/model.py") if not (repo / p).is_file()]
        if missing:
            raise SystemExit(f"{repo}: {', '.join(missing)} missing; point it at a checkout of "
                             "https://github.com/kding1225/softcpt (git clone, commit 7cab4b9)")
        _install_dassl_stand_in()
        sys.modules["dassl.metrics"].__dict__.setdefault("compute_accuracy_map", _unavailable)
        evaluation = types.ModuleType("dassl.evaluation")
        evaluation.build_evaluator = _unavailable
        sys.modules.setdefault("dassl.evaluation", evaluation)
        self.clip, self.module = import_checkout(repo, "clip.clip", "trainers.mtcoop")
        self.backbone = backbone

    def model(self, tasknames, classnames_per_task, n_ctx: int = 16, task_n_ctx: int = 4):
        size = self.backbone.image_size
        cfg = _node(TRAINER=_node(MTCOOP=_node(
            TASK_N_CTX=task_n_ctx, TASK_CTX_INIT="", TASK_CSC=False, TASK_TOKEN_POSITION="end",
            N_CTX=n_ctx, CTX_INIT="", CSC=False, TOKEN_POSITION="end", PG_TYPE="lin", CLS_SAMPLE_RATE=0.0,
            PREC="fp32")), INPUT=_node(SIZE=(size, size)), OUTPUT_DIR="")
        model = self.module.CustomCLIP(cfg, list(tasknames), [list(c) for c in classnames_per_task],
                                       clip_on(self.clip, self.backbone))
        for name, p in model.named_parameters():  # MTCoOp.build_model's trainable set
            p.requires_grad_(any(k in name for k in ("prompt_learner", "prompt_gen")))
        self._ranges = []
        start = 0
        for names in classnames_per_task:
            self._ranges.append((start, start + len(names)))
            start += len(names)
        return model.train()

    def loss(self, logits: torch.Tensor, label: torch.Tensor):
        """``MTCoOp.mutitask_loss`` on a stand-in trainer holding what it reads."""
        trainer = types.SimpleNamespace(num_tasks=len(self._ranges), cls_range=self._ranges,
                                        taskid2type=["sl"] * len(self._ranges))
        return self.module.MTCoOp.mutitask_loss(trainer, logits, label)
