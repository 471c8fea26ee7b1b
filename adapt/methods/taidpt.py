"""TaI-DPT (Guo et al., CVPR 2023, "Texts as Images in Prompt Tuning for Multi-Label Image
Recognition"; guozix/TaI-DPT@1333eca): double-grained prompts trained on captions only.

Two CoOp contexts, ``ctx`` (global) and ``ctx_double`` (local), give each class k the text
features ``t_k`` and ``t'_k`` (prompts ``[SOS] ctx <name> . [EOS]``, frozen CLIP). Training reads
no image: a batch is a caption's token ids (``data.captions``, labelled by the classes it names:
adapt/data/captions.py). With ``h_j`` the caption's projected, L2-normalised output at every
position j up to its end-of-text token and ``g`` the one at that token (its CLIP text feature)::

    s_glob_k = 4 · g · t̂_k
    a_kj     = h_j · t̂'_k
    s_loc_k  = Σ_j softmax_j(50 · a_kj) · 4 · a_kj
    L        = rank(s_glob, y) + rank(s_loc, y)      (pairwise hinge, margin 1: tasks/losses.py)

(``trainers/Caption_distill_double.py:DenseCLIP.forward`` and ``trainers/utils.py:ranking_loss``,
its ``double_ranking`` loss). At test time the image stands in for the caption: ``g`` is the
pooled image feature and ``h_j`` its spatial tokens, with the spatial scale 40 (the image's,
``spatial_SCALE_image``; 4 for NUS-WIDE in the original's config), and the score is
``0.5 · s_glob + 0.5 · s_loc`` (``GL_merge_rate``, the evaluator's ``default_merge_aux``: "TaI-DPT"
in its README; ``merge: 1`` is its global-only "TaI"). Defaults are its configs'
(``configs/trainers/Caption_distill_double/rn50_*.yaml``, ``train_caption.py``): 16 + 16 context
vectors N(0, 0.02) shared by the classes, the fixed logit scale 4, and in the recipe SGD lr 1e-4,
batch 512 captions, 20 epochs cosine after one warm-up epoch at a constant 1e-5, wd 5e-4.

Deliberate departures from the original:

* **Which image tokens.** The original is ResNet-only: ``g`` is the attention pool's output
  without positional embeddings and ``h_j = c_proj(v_proj(layer4_j))``. Here ``features: value``
  (default) reads the value path wherever the backbone has one (``adapt/dense.py``: a ViT's last
  block with each token attending to itself, MaskCLIP's trick; on a ResNet ``c_proj(v_proj(layer4))``
  as the original) and ``g`` is the pooled feature (a ViT's class token; a ResNet's attention pool
  *with* its positional embeddings): logits cannot match its numbers on the same RN weights.
* **Model selection.** Its VOC / COCO loaders use the test set as validation and keep the best
  epoch on it (``FINAL_MODEL: best_val``); here the last epoch is evaluated.
* The learnable temperatures it creates but never uses with its configs (``IF_LEARN_SCALE`` /
  ``IF_LEARN_spatial_SCALE`` false) are not created: they would count as parameters and be saved.
* Lemmatising the captions by spelling rules rather than nltk's tagger and WordNet (whose models
  need a download), and matching names in a fixed order rather than a Python set's
  (adapt/data/captions.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapt.methods.base import Method, MethodOutput, as_output
from adapt.methods.prompts import ContextPrompts
from adapt.methods.registry import register_method
from adapt.tasks.losses import ranking_loss

FEATURES = ("value", "tokens")
CAPTIONS = ("a caption corpus (a text file of one caption per line, a JSON list, or COCO's "
            "captions_train2017.json), e.g. data.captions.file=captions.txt; the world writes one: "
            "python -m adapt.data.world.corpus world_multi_colour captions.txt")
# the original's padding mask: added to the cosines before the softmax and the sum (exp underflows to 0)
MASKED = -1e4


@dataclass
class TaIDPTConfig:
    n_ctx: int = 16  # each of the two contexts (N_CTX)
    # "" = random N(0, init_std) init; words initialise from their embeddings (their count sets M)
    ctx_init: str = ""
    csc: bool = False  # class-specific contexts
    init_std: float = 0.02
    logit_scale: float = 4.0  # fixed (IF_LEARN_SCALE false)
    text_spatial_scale: float = 50.0  # spatial_SCALE_text: the softmax over a caption's positions
    image_spatial_scale: float = 40.0  # spatial_SCALE_image: over an image's tokens (NUS-WIDE: 4)
    merge: float = 0.5  # GL_merge_rate: score = merge · global + (1 − merge) · local
    features: str = "value"  # the image's spatial tokens: the value path, or the last block's tokens
    margin: float = 1.0  # the ranking hinge's margin

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"method.features={self.features!r} is not one of {', '.join(FEATURES)}")
        if self.n_ctx < 1 and not self.ctx_init:
            raise ValueError("n_ctx must be >= 1 (or give ctx_init)")
        if not 0.0 <= self.merge <= 1.0:
            raise ValueError(f"method.merge={self.merge} must be in [0, 1] (the global score's weight)")
        if min(self.logit_scale, self.text_spatial_scale, self.image_spatial_scale) <= 0:
            raise ValueError("logit_scale, text_spatial_scale and image_spatial_scale must be > 0")


def local_scores(tokens: torch.Tensor, text: torch.Tensor, spatial: float, scale: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_j softmax_j(spatial · a_kj) · scale · a_kj`` [B, K] for normalised tokens [B, J, d] and
    class features [K, d]; ``mask`` [B, J] marks the valid positions (a caption's)."""
    a = tokens @ text.to(tokens.dtype).t()  # [B, J, K]
    if mask is not None:
        a = a + MASKED * (~mask)[..., None].to(a.dtype)
    return (F.softmax(spatial * a, dim=1) * scale * a).sum(1)


@register_method("taidpt")
class TaIDPT(Method):
    Config = TaIDPTConfig
    trainable_kind = "text context (trained on captions)"
    supports_feature_cache = True
    tasks = ("multi_label",)
    trains_on = "captions"
    requires_data = {"captions.file": CAPTIONS}

    def __init__(self, config: TaIDPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.dense_inputs = ("pooled", config.features)
        self.repointable = not config.csc
        self.repoint_fix = "method.csc=false"
        n = len(self.classnames)
        self.global_prompts = ContextPrompts(backbone, config.n_ctx, config.ctx_init, config.csc, "end", n,
                                             config.init_std)
        self.local_prompts = ContextPrompts(backbone, config.n_ctx, config.ctx_init, config.csc, "end", n,
                                            config.init_std)
        self.rebuild_classes()

    def rebuild_classes(self) -> None:
        self.global_prompts.build(self.classnames)
        self.local_prompts.build(self.classnames)

    def text_features(self) -> torch.Tensor:
        """[2, K, d]: the normalised global and local class features."""
        return self.cached_text_features(
            lambda: torch.stack([self.global_prompts.text_features(), self.local_prompts.text_features()]))

    def scores(self, pooled, tokens, spatial: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(global, local) scores [B, K] of normalised pooled features and tokens."""
        cfg = self.config
        text = self.text_features()
        glob = cfg.logit_scale * pooled @ text[0].to(pooled.dtype).t()
        return glob, local_scores(tokens, text[1], spatial, cfg.logit_scale, mask)

    def merged(self, glob: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return self.config.merge * glob + (1 - self.config.merge) * local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x).logits

    def output(self, x: torch.Tensor) -> MethodOutput:
        if x.dtype in (torch.int32, torch.int64):  # a caption batch (training): token ids [B, L]
            with torch.no_grad():  # the frozen tower: gradients reach only the prompts
                dense = self.backbone.encode_text_dense(self.backbone.embed_tokens(x), x)
            glob, local = self.scores(dense.pooled, dense.tokens, self.config.text_spatial_scale, dense.mask)
        else:
            dense = self.dense_features_of(x)
            glob, local = self.scores(dense.pooled, getattr(dense, self.config.features),
                                      self.config.image_spatial_scale)
        return MethodOutput(self.merged(glob, local), {"global": glob, "local": local})

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        out = as_output(out)
        if "global" not in out.tensors:  # bare logits: only the merged score is known
            raise ValueError("taidpt's loss needs the global and local scores of output(); pass its MethodOutput")
        margin = self.config.margin
        return ranking_loss(out.tensors["global"], labels, margin) + ranking_loss(out.tensors["local"], labels, margin)
