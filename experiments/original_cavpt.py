"""The original CAVPT (DPT), imported from a user's checkout of fanrena/DPT, beside adapt's.

    from experiments.original_cavpt import OriginalCAVPT, copy_state
    ref = OriginalCAVPT("/path/to/DPT", backbone)     # a clone at 11fef90 or later
    trainer = ref.dpt(classnames, bottom_limit=2)      # trainers/DPT.py: the DPT trainer's model
    copy_state(trainer.model, method)                  # adapt's values into the original's modules
    trainer.forward_backward({"img": images, "label": labels})   # its own loss, backward only

Nothing of the original is copied or committed: its ``trainers/DPT.py`` and ``clip/`` are imported
from the folder the user names, Dassl stood in (``experiments/original_coop.py``). The model is
``CustomCLIP_Selected_CoVPTDeep`` as ``DPT.build_model`` makes it with ``PREC: fp32`` on the
weights of an adapt backbone, without the download, with one change: the CAVPT module, which the
code forces to fp16 (``.half()``, which with fp32 inputs cannot run), is put back to fp32. The
trainer's ``model_backward_and_update`` only runs the backward here, so that the gradients of its
loss can be compared (its three optimizers are not built).
"""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.original_coop import _install_dassl_stand_in, _node, clip_on, import_checkout

DATASET = "ImageNet"  # a key of the original's CUSTOM_TEMPLATES: "a photo of a {}."


class OriginalCAVPT:
    """The original DPT trainer of a checkout, on the weights of an adapt backbone."""

    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        missing = [p for p in ("trainers/DPT.py", "clip/model.py") if not (repo / p).is_file()]
        if missing:
            raise SystemExit(f"{repo}: {', '.join(missing)} missing; point it at a checkout of "
                             "https://github.com/fanrena/DPT (git clone, commit 11fef90)")
        _install_dassl_stand_in()
        self.clip, self.dpt_module = import_checkout(repo, "clip.clip", "trainers.DPT")
        self.backbone = backbone

    def dpt(self, classnames, n_ctx: int = 16, n_vpt: int = 10, cpn: int = 10, bottom_limit: int = 12,
            pretrain_c: int = 30, alpha: float = 0.3):
        """The DPT trainer with its model built as ``build_model`` builds it (fp32)."""
        size = self.backbone.image_size
        cfg = _node(TRAINER=_node(COOP=_node(N_CTX=n_ctx, CTX_INIT="", CSC=False, CLASS_TOKEN_POSITION="end",
                                             PREC="fp32"),
                                  VPT=_node(N_CTX=n_vpt), SELECTED_COVPT=_node(CPN=cpn),
                                  TOPDOWN_SECOVPT=_node(BOTTOMLIMIT=bottom_limit), ALPHA=alpha),
                    PRETRAIN=_node(C=pretrain_c), DATASET=_node(NAME=DATASET),
                    INPUT=_node(SIZE=(size, size)), MODEL=_node(INIT_WEIGHTS=""))
        model = self.dpt_module.CustomCLIP_Selected_CoVPTDeep(cfg, list(classnames),
                                                              clip_on(self.clip, self.backbone), "cpu")
        model.image_encoder.transformer.extractor.float()  # the code's .half(): fp32 here
        for name, p in model.named_parameters():  # build_model's filter
            p.requires_grad_("image_encoder.transformer.ctx_learner" in name or "extractor" in name
                             or "prompt_learner" in name)
        trainer = object.__new__(self.dpt_module.DPT)
        trainer.cfg, trainer.device, trainer.model = cfg, torch.device("cpu"), model
        trainer.classnames, trainer.num_classes = list(classnames), len(classnames)
        trainer.class_prompt_num = min(cpn, len(classnames))
        trainer.pretrain_c, trainer.alpha, trainer.epoch = pretrain_c, alpha, 0
        trainer.model_backward_and_update = lambda loss, names=None: loss.backward()
        return trainer


def original_tensors(model) -> dict:
    """adapt's parameter name -> (the original's parameter, the row of it, or None for all)."""
    ext = model.image_encoder.transformer.extractor
    vpt = model.image_encoder.transformer.ctx_learner.ctx
    out = {"prompts.ctx": (model.prompt_learner.ctx, None), "extractor.ctx": (ext.ctx, None)}
    out.update({f"vpt.{i}": (vpt, i) for i in range(vpt.shape[0])})
    for j in range(ext.ctx.shape[0]):
        for mine, theirs in (("meta_nets", ext.meta_nets[j]), ("q", ext.attns[j].qmlp), ("k", ext.attns[j].kmlp),
                             ("v", ext.attns[j].vmlp), ("lns", ext.lns[j]), ("classifiers", ext.classfiers[j]),
                             ("lns2", ext.lns2[j])):
            out.update({f"extractor.{mine}.{j}.{n}": (p, None) for n, p in theirs.named_parameters()})
    return out


def copy_state(model, method) -> None:
    """Give the original's modules adapt's values (context, VPT tokens, the CAVPT modules)."""
    ours, theirs = method.trainable_state(), original_tensors(model)
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))
    with torch.no_grad():
        for name, (p, row) in theirs.items():
            (p if row is None else p[row]).copy_(ours[name])


def original_gradients(model) -> dict:
    """adapt's parameter name -> the original's gradient of that tensor."""
    return {name: p.grad if row is None else p.grad[row] for name, (p, row) in original_tensors(model).items()}
