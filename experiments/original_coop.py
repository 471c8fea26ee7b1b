"""The original CoOp / CoCoOp code, imported from a user's checkout, for timing beside adapt.

    from experiments.original_coop import OriginalCoOp
    ref = OriginalCoOp("/path/to/KaiyangZhou/CoOp", backbone)      # a clone at ff61507 or later
    trainer = ref.coop(classnames, n_ctx=16)                         # or ref.cocoop(classnames)
    trainer.forward_backward({"img": images, "label": labels})      # the original's own step

Nothing of the original is copied here or committed: its ``trainers/coop.py``,
``trainers/cocoop.py`` and ``clip/`` are imported from the folder the user names. The original
trainers subclass Dassl's ``TrainerX``; when Dassl is not installed, the few pieces their
``forward_backward`` touches are provided by a stand-in (``_install_dassl_stand_in``): the
zero-grad / finite-loss check / backward / step of Dassl's ``model_backward_and_update``, its
top-k ``compute_accuracy``, and a registry decorator. Model construction follows the trainers'
``build_model`` with ``PREC: fp32`` (the CLIP model made from the same weights as adapt's
backbone through the original's ``clip.build_model``, which stores them in fp16, then
``.float()``, then sharing the backbone's tensors; every parameter frozen but the prompt learner's; SGD as CoOp's configs), without
its download, data manager or scheduler (the learning-rate update at the last batch of an epoch
never happens in a timed step).
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch

SGD = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)  # configs/trainers/CoOp/*.yaml OPTIM


def _node(**kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(**kw)


def _install_dassl_stand_in() -> None:
    """The parts of Dassl the original trainers import and their ``forward_backward`` calls."""
    try:
        importlib.import_module("dassl.engine")
        return  # the real Dassl is installed: use it
    except ImportError:
        pass

    class Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    class TrainerX:
        batch_idx, num_batches = 0, 1 << 30  # never the epoch's last batch: no scheduler step

        def model_backward_and_update(self, loss, names=None):  # Dassl's order: zero, check, backward, step
            self.optim.zero_grad()
            if not torch.isfinite(loss).all():
                raise FloatingPointError("Loss is infinite or NaN!")
            loss.backward()
            self.optim.step()

        def update_lr(self, names=None):
            pass

    def compute_accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum() * 100.0 / target.size(0) for k in topk]

    def unavailable(*_a, **_k):
        raise RuntimeError("not part of the Dassl stand-in (experiments/original_coop.py)")

    mods = {"dassl": _node(), "dassl.engine": _node(TRAINER_REGISTRY=Registry(), TrainerX=TrainerX),
            "dassl.metrics": _node(compute_accuracy=compute_accuracy),
            "dassl.utils": _node(load_pretrained_weights=unavailable, load_checkpoint=unavailable),
            "dassl.optim": _node(build_optimizer=unavailable, build_lr_scheduler=unavailable)}
    for name, ns in mods.items():
        module = types.ModuleType(name)
        module.__dict__.update(vars(ns))
        sys.modules[name] = module


CLIP_MODULES = ("clip", "clip.clip", "clip.model", "clip.simple_tokenizer")


def import_checkout(root: Path, *modules: str) -> list:
    """``modules`` imported from the folder ``root`` of a user's checkout (first on ``sys.path``
    while they import). Each checkout vendors its own ``clip/`` and ``trainers/``: copies an earlier
    import left (another checkout's) are dropped first, so this checkout's answer."""
    for name in (*CLIP_MODULES, *modules, *{m.split(".")[0] for m in modules}):
        sys.modules.pop(name, None)
    sys.path.insert(0, str(root))
    try:
        return [importlib.import_module(m) for m in modules]
    finally:
        sys.path.remove(str(root))


def clip_on(clip, backbone) -> torch.nn.Module:
    """An original's CLIP on the backbone's weights: its ``clip.build_model`` (fp16 storage), then fp32
    as ``PREC: fp32`` does, then the backbone's own tensors (the same keys: open_clip keeps OpenAI's
    layout), so the two models share one copy of the weights."""
    state = backbone.model.state_dict()
    model = clip.build_model({k: v.detach().clone() for k, v in state.items()}).float().eval()
    model.load_state_dict(state, assign=True)
    return model


class OriginalCoOp:
    """The original trainers of a CoOp checkout, built on the weights of an adapt backbone."""

    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        missing = [p for p in ("trainers/coop.py", "trainers/cocoop.py", "clip/model.py") if not (repo / p).is_file()]
        if missing:
            raise SystemExit(f"--reference-repo {repo}: {', '.join(missing)} missing; point it at a "
                             "checkout of https://github.com/KaiyangZhou/CoOp (git clone, commit ff61507)")
        _install_dassl_stand_in()
        # the trainers: `from clip import clip`
        self.clip, self.coop_module, self.cocoop_module = import_checkout(
            repo, "clip.clip", "trainers.coop", "trainers.cocoop")
        self.repo = repo
        self.commit = _head(repo)
        self.backbone = backbone

    def clip_model(self) -> torch.nn.Module:
        """The original's CLIP on the backbone's weights: ``clip.build_model`` (fp16), then fp32 as
        the trainers' ``PREC: fp32`` does."""
        return clip_on(self.clip, self.backbone)

    def _trainer(self, module, cls_name: str, key: str, classnames, n_ctx: int, ctx_init: str):
        cfg = _node(TRAINER=_node(**{key: _node(N_CTX=n_ctx, CTX_INIT=ctx_init, CSC=False,
                                                CLASS_TOKEN_POSITION="end", PREC="fp32")}),
                    INPUT=_node(SIZE=(self.backbone.image_size, self.backbone.image_size)),
                    MODEL=_node(INIT_WEIGHTS=""))
        model = module.CustomCLIP(cfg, list(classnames), self.clip_model())
        for name, p in model.named_parameters():  # build_model: only the prompt learner trains
            p.requires_grad_("prompt_learner" in name)
        trainer = object.__new__(getattr(module, cls_name))
        trainer.cfg, trainer.device, trainer.model = cfg, torch.device("cpu"), model
        trainer.optim = torch.optim.SGD(model.prompt_learner.parameters(), **SGD)
        trainer.scaler = None
        trainer.model.train()
        return trainer

    def coop(self, classnames, n_ctx: int = 16, ctx_init: str = ""):
        return self._trainer(self.coop_module, "CoOp", "COOP", classnames, n_ctx, ctx_init)

    def cocoop(self, classnames, n_ctx: int = 4, ctx_init: str = "a photo of a"):
        return self._trainer(self.cocoop_module, "CoCoOp", "COCOOP", classnames, n_ctx, ctx_init)


def round_to_fp16(backbone) -> None:
    """Make the backbone's weights fp16 numbers (as OpenAI's released weights are), so that the
    original's ``build_model``, which stores them in fp16, holds exactly the same values."""
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.copy_(p.half().float())


def copy_prompt_state(trainer, method) -> None:
    """Give the original's prompt learner adapt's trained values (context, CoCoOp's meta-net), so
    that both compute the same logits."""
    state = method.trainable_state()
    learner = trainer.model.prompt_learner
    with torch.no_grad():
        learner.ctx.copy_(state["prompts.ctx"])
        if hasattr(learner, "meta_net"):
            for ours, theirs in (("meta_net.0", "linear1"), ("meta_net.2", "linear2")):
                getattr(learner.meta_net, theirs).weight.copy_(state[f"{ours}.weight"])
                getattr(learner.meta_net, theirs).bias.copy_(state[f"{ours}.bias"])


def _head(repo: Path) -> str:
    head = repo / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (repo / ".git" / ref[5:]).read_text().strip()[:7]
        return ref[:7]
    except OSError:
        return "unknown (not a git checkout)"
