"""Zero-shot classifiers from class descriptions: CuPL and VCD (one shared path, training-free).

* ``cupl`` -- CuPL (Pratt et al., ICCV 2023; sarahpratt/CuPL@719619c, ``classify_imagenet.py``
  ``zeroshot_classifier_gpt``): each class's LLM-written sentences (``data.class_text.descriptions``,
  the original's JSON format) are its prompts; the classifier is the normalized mean of their
  normalized features. ``data.class_text.templates: true`` is the original's "both": the
  dataset's templates (all of them, as it puts the 80 ImageNet templates in) join the same mean.
* ``vcd`` -- classification by description (Menon & Vondrick, ICLR 2023;
  sachit-menon/classify_by_description_release@d1a3d89, ``load.py`` / ``loading_helpers.py`` /
  ``main.py``): each class's descriptor phrases (``data.class_text.descriptors``) become
  "{name}, which has {phrase}" by the original's rule (``compose_descriptor``), and a class scores
  the mean of the image's cosines with them (``mean_score``); ``max`` is the original's other
  aggregation. ``explain`` gives each descriptor's share, as its ``show_from_indices`` does.

Deliberate departures from the originals (the classifiers are theirs to fp32 round-off,
``tests/test_descriptions.py``):

* Classes are matched to file keys by normalised name, never by the file's order (VCD builds its
  label order from the JSON's keys: with its Pets file that misaligns, VCD#10); a class missing
  from the file, an empty description list or two keys for one class are refused up front
  (adapt/data/class_text.py). Prompts name a class as the dataset spells it.
* Scores are CLIP's logit scale times the cosines (the originals take the argmax of the raw
  cosines: the same predictions; the scale makes the softmax CLIP's).
* VCD's ``after_text`` is "." on ImageNet only in the original (``load.py``); here it is a config
  field (default ""), set to "." in the ImageNet recipe. Its ``'sum'`` aggregation is left out
  (it ranks a class by how many descriptors it has).
* Long sentences are truncated to the context (CuPL's ``truncate=True``); VCD's tokenizer would
  raise on them instead.
* CuPL's file for ImageNet repeats class names (two "missile", two "sunglasses", CuPL#2), whose
  identical prompts make the second class of each pair unpredictable: a dataset with such
  duplicates is refused by adapt's loaders before this method runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from adapt.methods.base import HandWrittenClassifier, check_templates, is_features
from adapt.methods.class_text import class_means, class_prompts, compose_descriptor, encode_class_prompts
from adapt.methods.registry import register_method

DESCRIPTIONS = ("a JSON file of sentences per class, CuPL's format {class: [sentence, ...]}, e.g. "
                "data.class_text.descriptions=descriptions.json (the world writes one: "
                "python -m adapt.data.world.descriptions world_colour descriptions.json)")
DESCRIPTORS = ("a JSON file of descriptor phrases per class, VCD's format {class: [phrase, ...]}, e.g. "
               "data.class_text.descriptors=descriptors.json (the world writes one: python -m "
               "adapt.data.world.descriptions world_colour descriptors.json --format descriptors)")


def check_aggregate(aggregate: str, allowed: tuple[str, ...]) -> None:
    if aggregate not in allowed:
        raise ValueError(f"aggregate={aggregate!r} is not one of {', '.join(allowed)}")


class DescribedClassifier(HandWrittenClassifier):
    """A class's score from all of its prompts (``class_prompts``), by ``config.aggregate``:
    ``renorm_mean`` (the normalized mean feature), ``mean_score`` (the mean cosine), ``max`` (the
    best prompt's cosine). Keeps every prompt's feature for ``max`` and ``explain``."""

    supports_feature_cache = True
    trainable_kind = "nothing"

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.rebuild_classes()

    def compose(self, name: str, phrase: str) -> str:
        return compose_descriptor(name, phrase)

    def rebuild_classes(self) -> None:
        templates = self.hand_written_templates()
        per_class = [class_prompts(c, templates, self.class_text, self.compose) for c in self.classnames]
        self.prompts = [p for prompts in per_class for p in prompts]
        feats, owner = encode_class_prompts(self.backbone, per_class)
        mean = class_means(feats, owner, len(per_class))
        # renorm_mean: CuPL's classifier; mean_score: f . mean(e) = mean(f . e), VCD's
        text = F.normalize(mean, dim=-1) if self.config.aggregate == "renorm_mean" else mean
        self.register_buffer("text_features", text, persistent=False)
        self.register_buffer("prompt_features", feats, persistent=False)
        self.register_buffer("prompt_owner", owner, persistent=False)

    def prompt_scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """Cosines [B, N] of normalized image features with every prompt."""
        return image_features @ self.prompt_features.to(image_features.dtype).t()

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.config.aggregate != "max":
            return self.backbone.logits(image_features, self.text_features)
        scores = self.prompt_scores(image_features)
        best = scores.new_full((scores.shape[0], len(self.classnames)), float("-inf"))
        best = best.scatter_reduce(1, self.prompt_owner.expand_as(scores), scores, reduce="amax")
        return self.backbone.logit_scale * best

    @torch.no_grad()
    def explain(self, x: torch.Tensor, classes: Optional[torch.Tensor] = None, top: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the prompts of its predicted class (or of ``classes[i]``) with their cosines,
        best first (VCD's explanations): ``[[(prompt, cosine), ...], ...]``."""
        feats = x if is_features(x) else self.encode_images(x)
        feats = F.normalize(feats.float(), dim=-1)
        if classes is None:
            classes = self.forward_features(feats).argmax(dim=-1)
        scores = self.prompt_scores(feats)
        out = []
        for row, c in zip(scores, classes.tolist()):
            mine = (self.prompt_owner == c).nonzero().flatten()
            order = mine[row[mine].argsort(descending=True)][:top]
            out.append([(self.prompts[i], float(row[i])) for i in order.tolist()])
        return out


@dataclass
class CuPLConfig:
    # renorm_mean: CuPL's normalized mean of normalized sentence features; mean_score: VCD's
    # mean cosine, for comparing the two aggregations on the same sentences
    aggregate: str = "renorm_mean"
    # with data.class_text.templates: true ("both"): all of the dataset's templates join the
    # mean, as CuPL puts its 80 ImageNet templates in (false: the first one only)
    ensemble: bool = True
    # templates to use instead of the dataset's (with data.class_text.templates: true)
    templates: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_aggregate(self.aggregate, ("renorm_mean", "mean_score", "max"))
        check_templates(self.templates)


@register_method("cupl")
class CuPL(DescribedClassifier):
    """CuPL: each class's classifier the normalized mean of its LLM-written sentences."""

    Config = CuPLConfig
    requires_data = {"class_text.descriptions": DESCRIPTIONS}


@dataclass
class VCDConfig:
    # mean_score: VCD's 'mean' (the mean cosine over a class's descriptors); max: its 'max';
    # renorm_mean: CuPL's classifier on VCD's sentences
    aggregate: str = "mean_score"
    # where the class name goes (category_name_inclusion): prepend "{name}, which ...", append
    # "which ..., {name}", or none (the descriptor alone)
    name_inclusion: str = "prepend"
    # apply_descriptor_modification: "has ..." -> "which has ...", "a ..." -> "which is a ..."
    modify: bool = True
    before_text: str = ""
    between_text: str = ", "
    # "." on ImageNet in the original (load.py), "" on its other datasets
    after_text: str = ""
    # with data.class_text.templates: true, all of the dataset's templates join the mean, or the first
    ensemble: bool = False
    templates: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_aggregate(self.aggregate, ("mean_score", "max", "renorm_mean"))
        if self.name_inclusion not in ("prepend", "append", "none"):
            raise ValueError(f"name_inclusion={self.name_inclusion!r} is not one of prepend, append, none")
        check_templates(self.templates)


@register_method("vcd")
class VCD(DescribedClassifier):
    """VCD: each class scores the mean cosine of the image with its descriptor sentences."""

    Config = VCDConfig
    requires_data = {"class_text.descriptors": DESCRIPTORS}

    def compose(self, name: str, phrase: str) -> str:
        c = self.config
        return compose_descriptor(name, phrase, inclusion=c.name_inclusion, modify=c.modify,
                                  before=c.before_text, between=c.between_text, after=c.after_text)
