"""Text classifiers from any class text: templates, description sentences, descriptor phrases.

A class's prompts are its description sentences as written (CuPL), its descriptor phrases
composed with its name (VCD), and the templates filled with its name -- the templates alone when
the run has no class text, beside the sentences when ``data.class_text.templates`` is true
(CuPL's "both"). The prompts of all classes go through the text tower together, in chunks (a
1000-class file of 50 sentences each is 50,000 prompts: their embedded inputs alone would take
7.9 GB at ViT-B/16's width in one batch), and are averaged per class.

Two aggregations, both the field's:

* ``renorm_mean`` -- the normalized mean of the normalized prompt features: the templates'
  ensembling since CLIP, and CuPL's ``zeroshot_classifier_gpt``.
* ``mean_score`` -- the mean of the prompts' cosines with the image, VCD's ``aggregate_similarity``
  ('mean'): the same mean, not renormalized, so a class whose prompts disagree scores lower.

Departures from the originals: long sentences are cut to the tower's context with the end-of-text
token kept, as CuPL's ``clip.tokenize(truncate=True)`` does (open_clip's tokenizers always
truncate), where VCD's ``clip.tokenize`` raises on them; prompts are encoded in chunks across
classes rather than class by class (the same features to fp32 round-off,
tests/test_class_text.py). Otherwise none: VCD's descriptor rule is its own, quirks included.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from adapt.data.class_text import ClassText

# prompts per text-tower call: bounds the embedded input (prompts x context x width) of a large
# file while keeping the batch large enough to be fast; the tower chunks its activations itself
PROMPT_CHUNK = 1024


def vcd_descriptor(phrase: str) -> str:
    """VCD's ``make_descriptor_sentence``, exactly (its ``startswith('a')`` test also catches
    "antennae" -> "which is antennae": kept, since the paper's numbers were made with it)."""
    if phrase.startswith("a"):
        return f"which is {phrase}"
    if phrase.startswith(("has", "often", "typically", "may", "can")):
        return f"which {phrase}"
    if phrase.startswith("used"):
        return f"which is {phrase}"
    return f"which has {phrase}"


def compose_descriptor(name: str, phrase: str, inclusion: str = "prepend", modify: bool = True,
                       before: str = "", between: str = ", ", after: str = "") -> str:
    """One descriptor as a prompt, as VCD's ``load_gpt_descriptions`` builds it: ``prepend``
    "{before}{name}{between}{which ...}{after}", ``append`` "{which ...}{between}{name}", ``none``
    the (modified) phrase alone."""
    text = vcd_descriptor(phrase) if modify else phrase
    if inclusion == "prepend":
        return f"{before}{name}{between}{text}{after}"
    if inclusion == "append":
        return f"{text}{between}{name}"
    return text


def class_prompts(classname: str, templates: Sequence[str], class_text: Optional[ClassText],
                  compose=compose_descriptor) -> list[str]:
    """Every prompt of one class (see the module docstring); ``compose(name, phrase)`` turns a
    descriptor into a prompt."""
    if class_text is None:
        return [t.format(classname) for t in templates]
    if not class_text.covers(classname):
        raise ValueError(f"the class text (data.class_text) has no entry for {classname!r}; add it to the "
                         "descriptions / descriptors file, or point the method at classes the file covers")
    prompts = class_text.sentences_of(classname)
    phrases = class_text.descriptors_of(classname)
    if phrases is not None:  # an empty list is the name alone, as VCD's [''] gives it
        prompts += [compose(classname, p) for p in (phrases or [""])]
    if class_text.with_templates:
        prompts = [t.format(classname) for t in templates] + prompts
    return prompts


def prompt_features(backbone, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
    """Text features [N, d] of ``prompts``, PROMPT_CHUNK at a time, in the caller's grad mode."""
    out = []
    for start in range(0, len(prompts), PROMPT_CHUNK):
        tokens = backbone.tokenize(prompts[start:start + PROMPT_CHUNK])
        out.append(backbone.encode_text_embeddings(backbone.embed_tokens(tokens), tokens, normalize=normalize))
    return torch.cat(out)


def encode_class_prompts(backbone, per_class: Sequence[Sequence[str]], normalize_each: bool = True,
                         track_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, d] of every class's prompts, flat, and the class index [N] of each; frozen
    (no graph, fp32) unless ``track_grad``."""
    flat = [p for prompts in per_class for p in prompts]
    frozen = contextlib.ExitStack()
    if not track_grad:
        frozen.enter_context(torch.no_grad())
        frozen.enter_context(torch.autocast(backbone.logit_scale.device.type, enabled=False))
    with frozen:
        feats = prompt_features(backbone, flat, normalize=normalize_each)
    owner = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor([len(p) for p in per_class]))
    return feats, owner.to(feats.device)


def class_means(feats: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The mean [C, d] of each class's rows of ``feats``."""
    total = feats.new_zeros(num_classes, feats.shape[-1]).index_add(0, owner, feats)
    return total / torch.bincount(owner, minlength=num_classes).clamp_min(1)[:, None].to(feats.dtype)


def class_text_features(backbone, classnames: Sequence[str], templates: Sequence[str],
                        class_text: Optional[ClassText], normalize_each: bool = True,
                        normalize_mean: bool = True, track_grad: bool = False,
                        compose=compose_descriptor) -> torch.Tensor:
    """Per class, the mean of its prompts' features [C, d] (each prompt normalized first or not,
    the mean normalized or not); ``track_grad``: keep the graph (a method training the text
    tower's weights), else frozen and in fp32."""
    per_class = [class_prompts(c, templates, class_text, compose) for c in classnames]
    feats, owner = encode_class_prompts(backbone, per_class, normalize_each, track_grad)
    mean = class_means(feats, owner, len(classnames))
    return F.normalize(mean, dim=-1) if normalize_mean else mean


def text_feature_mean(backbone, classnames: Sequence[str], templates: Sequence[str],
                      normalize_each: bool = True, normalize_mean: bool = True,
                      track_grad: bool = False) -> torch.Tensor:
    """Per class, the mean over ``templates`` of its prompts' text features [C, d]; each
    template's features normalized first or not, the mean normalized or not (TaskRes keeps the
    raw mean of raw features, PromptSRC normalizes the mean of raw ones). ``track_grad``: keep
    the graph (and the trainer's precision), for methods that train the text tower's weights."""
    frozen = contextlib.ExitStack()
    if not track_grad:
        frozen.enter_context(torch.no_grad())
        frozen.enter_context(torch.autocast(backbone.logit_scale.device.type, enabled=False))
    with frozen:
        per_template = []
        for template in templates:
            tokens = backbone.tokenize([template.format(c) for c in classnames])
            per_template.append(backbone.encode_text_embeddings(backbone.embed_tokens(tokens), tokens,
                                                                normalize=normalize_each))
        mean = torch.stack(per_template).mean(dim=0)
        return F.normalize(mean, dim=-1) if normalize_mean else mean


def zero_shot_text_features(backbone, classnames: Sequence[str],
                            templates: Sequence[str]) -> torch.Tensor:
    """The zero-shot classifier: per class, the renormalized mean of its normalized template
    embeddings (a single template gives that template's embedding)."""
    return text_feature_mean(backbone, classnames, templates)
