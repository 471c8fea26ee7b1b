"""The original ProGrad, imported from a user's checkout of BeierZhu/Prompt-align, beside adapt's.

    from experiments.original_prograd import OriginalProGrad
    ref = OriginalProGrad("/path/to/Prompt-align", backbone)   # a clone at 1b76203 or later
    trainer = ref.prograd(classnames)                          # CTX_INIT True, N_CTX 16, λ = 1
    trainer.forward_backward({"img": images, "label": labels})  # the original's own step

Nothing of the original is copied or committed. From ``ProGrad.public/`` it imports the trainer
(``trainers/prograd.py``: the student ``CustomCLIP``, the zero-shot ``CLIP`` teacher, the
``ProGradLoss``) and its ``clip/``; from ``Dassl.ProGrad.pytorch/`` the projection
``TrainerBase.prograd_backward_and_update`` and the helpers it calls (``get_model_names``,
``model_zero_grad``, ``detect_anomaly``), read from the fork's ``dassl/engine/trainer.py`` with
the rest of Dassl stood in (``experiments/original_coop.py``). The models are built as the
trainer's ``build_model`` builds them with ``PREC: fp32``, on the weights of an adapt backbone,
without the download (the teacher's ``load_clip_to_cpu`` is pointed at those weights).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

from experiments.original_coop import SGD, _head, _install_dassl_stand_in, _node, clip_on, import_checkout

DATASET = "ImageNet"  # a key of the original's CUSTOM_TEMPLATES: "a photo of a {}."


class _Permissive(types.ModuleType):
    """A stand-in module whose every name exists (imported at the top of Dassl's trainer.py,
    never called by the projection)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object


def dassl_trainer_base(path: Path):
    """``TrainerBase`` of a Dassl fork's ``dassl/engine/trainer.py`` at ``path``, its imports stood in
    while it loads (ProGrad's and SubPT's forks add their projections to it)."""
    stand_ins = ["dassl.data", "dassl.modeling", "dassl.evaluation", "dassl.utils", "dassl.optim",
                 "torch.utils.tensorboard"]
    for optional in ("sklearn", "sklearn.decomposition"):  # SubPT's fork imports PCA, unused by the projection
        try:
            importlib.import_module(optional)
        except ImportError:
            stand_ins.append(optional)
    saved = {name: sys.modules.get(name) for name in stand_ins}
    try:
        for name in stand_ins:
            sys.modules[name] = _Permissive(name)
        spec = importlib.util.spec_from_file_location("prograd_dassl_trainer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.TrainerBase


class OriginalProGrad:
    """The original ProGrad trainer of a Prompt-align checkout, on the weights of an adapt backbone."""

    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        code = repo / "ProGrad.public"
        needed = [code / "trainers/prograd.py", code / "clip/model.py",
                  repo / "Dassl.ProGrad.pytorch/dassl/engine/trainer.py"]
        missing = [str(p.relative_to(repo)) for p in needed if not p.is_file()]
        if missing:
            raise SystemExit(f"{repo}: {', '.join(missing)} missing; point it at a checkout of "
                             "https://github.com/BeierZhu/Prompt-align (git clone, commit 1b76203)")
        _install_dassl_stand_in()
        base = dassl_trainer_base(repo / "Dassl.ProGrad.pytorch" / "dassl" / "engine" / "trainer.py")
        self.clip, self.module = import_checkout(code, "clip.clip", "trainers.prograd")
        self.project = base.prograd_backward_and_update
        self.helpers = {n: getattr(base, n) for n in ("get_model_names", "model_zero_grad", "detect_anomaly")}
        self.repo, self.commit, self.backbone = repo, _head(repo), backbone

    def clip_model(self) -> torch.nn.Module:
        return clip_on(self.clip, self.backbone)

    def prograd(self, classnames, n_ctx: int = 16, lam: float = 1.0, temperature: float = 1.0):
        cfg = _node(TRAINER=_node(COOP=_node(N_CTX=n_ctx, CTX_INIT=True, CSC=False,
                                             CLASS_TOKEN_POSITION="end", PREC="fp32")),
                    INPUT=_node(SIZE=(self.backbone.image_size, self.backbone.image_size)),
                    DATASET=_node(NAME=DATASET), MODEL=_node(INIT_WEIGHTS="", BACKBONE=_node(NAME="ViT-B/16")),
                    LOSS=_node(NAME="prograd", T=temperature, LAMBDA=lam))
        module = self.module
        module.load_clip_to_cpu = lambda _cfg: self.clip_model()  # the teacher's loader, no download
        model = module.CustomCLIP(cfg, list(classnames), self.clip_model())
        for name, p in model.named_parameters():  # build_model: only the prompt learner trains
            p.requires_grad_("prompt_learner" in name)
        teacher = module.CLIP(cfg, list(classnames))
        for p in teacher.parameters():
            p.requires_grad_(False)
        trainer = object.__new__(module.ProGrad)
        for name, fn in {**self.helpers, "prograd_backward_and_update": self.project}.items():
            setattr(trainer, name, types.MethodType(fn, trainer))
        trainer.cfg, trainer.device, trainer.model, trainer.zs_clip = cfg, torch.device("cpu"), model, teacher
        trainer.optim = torch.optim.SGD(model.prompt_learner.parameters(), **SGD)
        trainer._models = {"prompt_learner": model.prompt_learner}
        trainer._optims = {"prompt_learner": trainer.optim}
        trainer.criterion = module.ProGradLoss(T=temperature)
        trainer.scaler = None
        trainer.model.train()
        return trainer
