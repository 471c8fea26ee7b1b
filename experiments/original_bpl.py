"""The original Bayesian prompt learning, imported from a user's checkout of
saic-fi/Bayesian-Prompt-Learning, beside adapt's ``bpl``.

    from experiments.original_bpl import OriginalBPL
    model = OriginalBPL("/path/to/Bayesian-Prompt-Learning", backbone).bpl(classnames)
    loss = model(images, labels)         # train mode: the MC log-likelihood + 0.001 KL

Nothing of the original is copied or committed: ``trainers/vpt.py`` and its ``clip/`` are imported
from the folder the user names, Dassl stood in as for CoOp (``experiments/original_coop.py``).
``CustomCLIP`` is built as its trainer builds it with ``VPT_TYPE coopvpt`` (or ``cocoopvpt``) and ``PREC fp32``
(only the prompt learner trains), on the weights of an adapt backbone.
"""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.original_coop import _head, _install_dassl_stand_in, _node, clip_on, import_checkout


class OriginalBPL:
    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        missing = [p for p in ("trainers/vpt.py", "clip/model.py") if not (repo / p).is_file()]
        if missing:
            raise SystemExit(f"{repo}: {', '.join(missing)} missing; point it at a checkout of "
                             "https://github.com/saic-fi/Bayesian-Prompt-Learning (git clone, commit 8a73fff)")
        _install_dassl_stand_in()
        self.clip, self.module = import_checkout(repo, "clip.clip", "trainers.vpt")
        self.repo, self.commit, self.backbone = repo, _head(repo), backbone

    def clip_model(self) -> torch.nn.Module:
        return clip_on(self.clip, self.backbone)

    def bpl(self, classnames, samples: int = 10, variant: str = "global"):
        kind = {"global": "coopvpt", "conditional": "cocoopvpt"}[variant]
        cfg = _node(TRAINER=_node(VPT=_node(N_CTX=4, CTX_INIT="a photo of a", L=samples, VPT_TYPE=kind,
                                            PREC="fp32")),
                    INPUT=_node(SIZE=(self.backbone.image_size, self.backbone.image_size)))
        model = self.module.CustomCLIP(cfg, list(classnames), self.clip_model())
        for name, p in model.named_parameters():
            p.requires_grad_("prompt_learner" in name)
        return model.train()
