"""The original LASP, imported from a user's checkout of 1adrianb/lasp, beside adapt's.

    from experiments.original_lasp import OriginalLASP
    ref = OriginalLASP("/path/to/lasp", backbone)            # a clone at 5b1e8d9 or later
    model = ref.lasp(classnames, all_classnames)             # CustomCLIP as its trainer builds it
    loss = model(images, labels)                              # CE + λ · L_tt, in train mode

Nothing of the original is copied or committed: ``prompting/lasp.py`` (with its ``losses.py``)
and ``clip/`` are imported from the folder the user names, Dassl stood in as for CoOp
(``experiments/original_coop.py``). The model is built as the trainer's ``build_model`` builds
it (``PREC fp32``, the prompt learner and the image blocks' ``ln_1`` / ``ln_2`` trainable), on the
weights of an adapt backbone. Its reference features are computed with ``.cuda()`` calls, which
are made no-ops while it is built, so it runs on a CPU.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import torch

from experiments.original_coop import _head, _install_dassl_stand_in, _node, clip_on, import_checkout


@contextlib.contextmanager
def _no_cuda():
    """``Module.cuda`` and ``Tensor.cuda`` as no-ops (the original moves its text encoder and
    embeddings to the GPU while building its references)."""
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def _pkg_resources_stand_in() -> None:
    """Its ``clip/clip.py`` reads ``pkg_resources.packaging`` (setuptools < 81) for a version check."""
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        import types

        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)


class OriginalLASP:
    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        missing = [p for p in ("prompting/lasp.py", "prompting/losses.py", "clip/model.py") if not (repo / p).is_file()]
        if missing:
            raise SystemExit(f"{repo}: {', '.join(missing)} missing; point it at a checkout of "
                             "https://github.com/1adrianb/lasp (git clone, commit 5b1e8d9)")
        _install_dassl_stand_in()
        _pkg_resources_stand_in()
        self.clip, self.module = import_checkout(repo, "clip.clip", "prompting.lasp")
        self.repo, self.commit, self.backbone = repo, _head(repo), backbone

    def clip_model(self) -> torch.nn.Module:
        return clip_on(self.clip, self.backbone)

    def lasp(self, classnames, all_classnames, templates, weight: float = 5.0):
        cfg = _node(TRAINER=_node(LASP=_node(N_CTX=4, CTX_INIT="a photo of a", ENABLE=True, ENABLE_CORRECTION=True,
                                             TRAIN_W=True, FINETUNE_VIT_LN=True, LASP_PROMPTS=list(templates),
                                             LASP_LOSS_WEIGHT=weight, PREC="fp32")),
                    DATASET=_node(INCLUDE_ALL_CLASSES=False),
                    INPUT=_node(SIZE=(self.backbone.image_size, self.backbone.image_size)))
        with _no_cuda():
            model = self.module.CustomCLIP(cfg, list(classnames), self.clip_model(), list(all_classnames))
        for name, p in model.named_parameters():  # build_model's choice of what trains
            p.requires_grad_("prompt_learner" in name
                             or ("image_encoder" in name and ("ln_2" in name or "ln_1" in name)))
        return model.train()
