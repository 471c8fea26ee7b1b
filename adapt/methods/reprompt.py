"""RePrompt (Rong et al., "Retrieval-Enhanced Visual Prompt Learning for Few-shot
Classification", arXiv 2306.02243): visual prompt learning on CLIP whose stages consult a
retrieval index of the few-shot training images. **There is no released code**, and the paper's
method section could not be read here (the stored copies of arxiv.org/html/2306.02243v2/v3
give only the abstract and the opening of the introduction). What follows is built from the
abstract; everything the abstract does not state is a choice, named as one. Departures: there is
no original to depart from; the whole design below is adapt's reading, not a port.

What the abstract establishes (v3, and the v1 abstract as mirrored by bohrium / arxivlens):

* "RePrompt constructs a retrieval database from either training examples or external data if
  available" -> ``FeatureIndex`` (``adapt/methods/retrieval.py``) over the few-shot training
  images of the method's classes, built once in ``setup``. External data: not offered.
* "uses a retrieval mechanism to enhance multiple stages of a simple prompt learning baseline";
  v1: "integrate this retrieval-enhanced mechanism into various stages of a simple prompt
  learning baseline"; the title and the survey that cites it file it under *visual* prompts ->
  the baseline is adapt's ``vpt`` (deep VPT in CLIP's image tower, frozen hand-written text
  classifier, MaPLe's VPT settings), and retrieval enters two stages, below.
* "During inference, our enhanced model can reference similar samples brought by retrieval to
  make more accurate predictions" -> the kNN vote blended into the prediction.
* "retrieval helps to improve the distribution of late features" -> not used to choose anything
  (which layers, and how, is in the unread body).

The two stages (each a choice in its form):

1. **Input (retrieval-conditioned visual prompt).** The query is the image's frozen CLIP
   feature q. Its ``k`` nearest index entries, weighted w_j = softmax(sim_j / τ), give
   r = Σ_j w_j key_j (neighbour features only, no labels); a learnable linear map of r is added
   to every layer-0 visual prompt token of that image (CoCoOp's meta-net bias, conditioned on
   retrieved neighbours rather than on the image itself). The map is zero-initialised, so
   training starts from VPT. ``prompt_from_retrieval: false`` turns it off. (The v1 abstract
   sets RePrompt against prompts that are "a fixed prompt token or an input-conditional token";
   this one is a fixed token plus a retrieval-conditioned shift.)
2. **Output (kNN vote, in training and inference).** p_knn[c] = Σ_{j: y_j = c} w_j over the same
   neighbours; the prediction is p = (1 − λ)·softmax(z) + λ·p_knn with z the prompted model's
   logits, and the method's logits are log p (a softmax of log p is p, so the default
   cross-entropy on them is the NLL of the blend). λ = ``knn_weight``; at λ = 0 the logits are
   the prompted model's z exactly (not log softmax z). Probability interpolation follows kNN-LM
   (Khandelwal et al. 2020); the vote's softmax over similarities is a choice.

Training loss: cross-entropy of the blended prediction (the prompts learn what the vote gets
wrong). No extra loss term (the paper's loss is unknown).

Leave-one-out: a training image is in the index, so while training each query's single nearest
entry (its own, for every view of an indexed image) is dropped before the ``k`` are taken; in
evaluation nothing is dropped. This applies to both stages.

Choices where the paper is silent (all are Config fields):

* keys and queries: frozen CLIP image features (the index never changes, so it is built once
  and cached like features; retrieving with the prompted features would need re-encoding the
  training set as the prompts move); keys use the test transform, one view per image;
* ``k`` = 16, ``temperature`` τ = 0.01 (CLIP's own 1/100 scale for cosine similarities),
  ``knn_weight`` λ = 0.25 (kNN-LM's tuned value); exact search;
* prompts, schedule and optimizer: VPT's (``recipes/reprompt/fewshot.yaml`` = the VPT recipe);
* novel classes: the vote is over the training classes only, so with λ > 0 the method refuses to
  be re-pointed (``method.knn_weight=0`` makes it class-agnostic: the retrieval prompt reads no
  labels); no base-to-novel recipe.

Cost: one extra frozen forward of the image tower per batch (the query), on top of VPT's.
The index (keys and labels) is saved with the adapter (persistent buffers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapt.methods.deep_prompts import encode_prompted_images
from adapt.methods.registry import register_method
from adapt.methods.retrieval import FeatureIndex, encode_index, signature_of, training_items
from adapt.methods.vpt import VPT, VPTConfig


@dataclass
class RePromptConfig(VPTConfig):
    # neighbours retrieved per image (capped at the index size, minus one while training)
    k: int = 16
    # τ of the neighbour weights softmax(cos / τ)
    temperature: float = 0.01
    # λ: p = (1 − λ)·softmax(prompted logits) + λ·kNN vote; 0 = no vote (then exactly VPT's logits)
    knn_weight: float = 0.25
    # stage 1: a learnable (zero-initialised) map of the retrieved neighbours' mean feature added
    # to the first layer's visual prompt tokens
    prompt_from_retrieval: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k (neighbours retrieved) must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.knn_weight < 1:
            raise ValueError(f"knn_weight must be in [0, 1) (0 = no kNN vote), got {self.knn_weight}")
        if self.prompt_from_retrieval and (self.n_tokens == 0 or self.depth == 0):
            raise ValueError("prompt_from_retrieval adds the retrieved features to the visual prompt "
                             f"tokens, but n_tokens={self.n_tokens}, depth={self.depth} gives none: set "
                             "n_tokens and depth > 0, or prompt_from_retrieval=false")

    @property
    def retrieves(self) -> bool:
        return self.knn_weight > 0 or self.prompt_from_retrieval


@register_method("reprompt")
class RePrompt(VPT):
    Config = RePromptConfig
    trainable_kind = "vision prompts + retrieval map"

    def __init__(self, config: RePromptConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.repointable = config.knn_weight == 0
        self.repoint_fix = "method.knn_weight=0"
        device = backbone.logit_scale.device
        self.index = FeatureIndex(backbone.embed_dim, device=device)
        self.retrieval_proj: Optional[nn.Linear] = None
        if config.prompt_from_retrieval:
            proj = nn.Linear(backbone.embed_dim, backbone.vision_width, device=device)
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
            self.retrieval_proj = proj.to(backbone.dtype)
        self._index_of: Optional[tuple] = None  # what the index was built from

    # ------------------------------------------------------------------ index ------------------
    def setup(self, datamodule) -> None:
        """Build the index from the training images of this method's classes, once: a second
        call on the same items keeps it (the features come through the feature cache)."""
        if not self.config.retrieves:
            return
        items = training_items(self, datamodule, self.name)
        signature = signature_of(items)
        if signature == self._index_of and len(self.index) == len(items):
            return
        keys, labels = encode_index(self, datamodule, items)
        self.index.set(keys, labels)
        self._index_of = signature

    def scalars(self) -> dict[str, float]:
        return {"index_size": float(len(self.index))} if self.config.retrieves else {}

    def retrieve(self, images: torch.Tensor):
        """Each image's neighbours: weights softmax(sim / τ) [B, k] and entry indices [B, k];
        leave-one-out (the nearest dropped) in training mode."""
        with torch.no_grad():
            query = self.backbone.encode_image(images).float()
            sims, idx = self.index.search(query, self.config.k, exclude_nearest=self.training)
        return self.index.neighbour_weights(sims, self.config.temperature), idx

    # ------------------------------------------------------------------ forward ----------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not cfg.retrieves:
            return super().forward(images)
        weights, idx = self.retrieve(images)
        layers = self.vision.layers()
        if self.retrieval_proj is not None:
            mixed = self.index.mix(weights, idx).to(self.retrieval_proj.weight.dtype)
            bias = self.retrieval_proj(mixed)  # [B, W]
            layers = [layers[0][None] + bias[:, None, :], *layers[1:]]
        feats = encode_prompted_images(self.backbone, images, layers)
        logits = self.backbone.logits(feats, self.text_features)
        if cfg.knn_weight == 0:
            return logits
        return blend(logits, self.index.vote(weights, idx, len(self.classnames)), cfg.knn_weight)

    # ------------------------------------------------------------------ state ------------------
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resize the index to the saved one (its size is the number of training images)."""
        keys, labels = state.get("index.keys"), state.get("index.labels")
        if keys is not None and labels is not None:
            if len(labels) and int(labels.max()) >= len(self.classnames):
                raise ValueError(f"reprompt: the saved index has labels up to {int(labels.max())} "
                                 f"but this model has {len(self.classnames)} classes")
            self.index.resize_like(keys, labels)
            self._index_of = None
        super().load_trainable_state(state)


def blend(logits: torch.Tensor, knn: torch.Tensor, weight: float) -> torch.Tensor:
    """log((1 − λ)·softmax(logits) + λ·knn), in fp32, returned in the logits' dtype."""
    p = (1 - weight) * F.softmax(logits.float(), dim=-1) + weight * knn.float()
    return p.clamp_min(torch.finfo(torch.float32).tiny).log().to(logits.dtype)
