"""The original UPT, imported from a user's checkout of yuhangzang/UPT, beside adapt's.

    from experiments.original_upt import OriginalUPT, copy_generator_state
    ref = OriginalUPT("/path/to/UPT", backbone)     # a clone at 3d1640f (the code release) or later
    model = ref.custom_clip(classnames)              # trainers/unified.py: CustomCLIP, N_CTX 4
    copy_generator_state(model, method)              # adapt's values into the original's learner

Nothing of the original is copied or committed: its ``trainers/unified.py`` (with the
``trainers/coop.py`` it imports) and its ``clip/`` are imported from the folder the user names,
Dassl stood in (``experiments/original_coop.py``). The model is built as ``Unified_v6.build_model``
builds it with ``PREC: fp32``, on the weights of an adapt backbone, without the download. One
release bug is bridged, as the fork's commit 83bd35a fixes it in the code: ``CustomCLIP.forward``
calls ``forward_prompt_shallow``, which the release's ``clip/model.py`` names ``forward_prompt``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.original_coop import _install_dassl_stand_in, _node, clip_on, import_checkout

# adapt's generator parameter -> the original PromptLearner's (the same module names, U unbatched)
NAMES = ("uni_ctx", "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
         "self_attn.out_proj.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
         "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "mlp.weight", "mlp.bias")


class OriginalUPT:
    """The original UPT model of a checkout, on the weights of an adapt backbone."""

    def __init__(self, repo: str | Path, backbone):
        repo = Path(repo).expanduser().resolve()
        missing = [p for p in ("trainers/unified.py", "trainers/coop.py", "clip/model.py")
                   if not (repo / p).is_file()]
        if missing:
            raise SystemExit(f"{repo}: {', '.join(missing)} missing; point it at a checkout of "
                             "https://github.com/yuhangzang/UPT (git clone, commit 3d1640f or later)")
        _install_dassl_stand_in()
        self.clip, self.model_module, self.unified = import_checkout(repo, "clip.clip", "clip.model",
                                                                     "trainers.unified")
        vit = self.model_module.VisionTransformer
        if not hasattr(vit, "forward_prompt_shallow"):  # the release's name mismatch (fork 83bd35a)
            vit.forward_prompt_shallow = vit.forward_prompt
        self.backbone = backbone

    def custom_clip(self, classnames, n_ctx: int = 4, ctx_init: str = "a photo of a"):
        """``CustomCLIP`` as ``Unified_v6.build_model`` makes it (fp32, only the prompt learner
        trainable), in train mode."""
        size = self.backbone.image_size
        cfg = _node(TRAINER=_node(COOP=_node(N_CTX=n_ctx, CTX_INIT=ctx_init, CSC=False,
                                             CLASS_TOKEN_POSITION="end", PREC="fp32")),
                    INPUT=_node(SIZE=(size, size)), MODEL=_node(INIT_WEIGHTS=""))
        model = self.unified.CustomCLIP(cfg, list(classnames), clip_on(self.clip, self.backbone))
        for name, p in model.named_parameters():
            p.requires_grad_("prompt_learner" in name)
        return model.train()


def copy_generator_state(model, method) -> None:
    """Give the original's prompt learner adapt's generator values."""
    learner, ours = model.prompt_learner, dict(method.generator.named_parameters())
    with torch.no_grad():
        for name in NAMES:
            theirs = learner.get_parameter(name)
            theirs.copy_(ours[name].reshape(theirs.shape))
