"""``unsupervised`` (UPL, Huang et al. 2022, "Unsupervised Prompt Learning for Vision-Language
Models"): the zero-shot model labels the unlabelled training images, the most confident
``data.shots`` (N, 16 by default) per predicted class are kept, and any prompt method trains on
those pseudo-labels.

As in UPL's ``select_top_k_similarity_per_class``: softmax of the zero-shot logits, each image's
label is its argmax and its confidence the max probability; per class, the images predicted as
that class, by confidence, the top N (a class predicted for fewer images keeps fewer; counts
are recorded). The true training labels are read for one number only, the pseudo-label
accuracy reported in ``results.json``; nothing selects on it. There is no validation split
(it would need labels). Departure: UPL ensembles the pseudo-labels of several CLIP backbones in
its best variant; this uses the run's own backbone and the dataset's first template.

Unlabelled data in general (CLIPPR; ``adapt/data/priors.py``): the pool is the training split
with its labels dropped, or the images of ``data.unlabelled.folder`` when one is given (then
no truth is known and no pseudo-label accuracy is reported). ``data.shots: 0`` (or negative)
keeps the whole pool unlabelled (label -1) for a method that makes its own targets
(``Method.learns_unlabelled``: CLIPPR's online zero-shot argmax); any other method is refused
with it before anything loads (``check_method``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from adapt.data.items import Item
from adapt.data.folder import unlabelled_folder_paths
from adapt.settings.base import Plan, Setting
from adapt.settings.registry import register_setting


def select_confident(probs: torch.Tensor, per_class: int) -> tuple[list[int], list[int], list[int]]:
    """Top-``per_class`` images of each predicted class: (image indices, pseudo labels, count of
    each class). Ties in confidence go to the earlier image."""
    conf, pred = probs.max(dim=1)
    order = sorted(range(len(conf)), key=lambda i: (-float(conf[i]), i))
    chosen: list[int] = []
    counts = [0] * probs.shape[1]
    for i in order:
        c = int(pred[i])
        if counts[c] < per_class:
            counts[c] += 1
            chosen.append(i)
    chosen.sort(key=lambda i: (int(pred[i]), -float(conf[i]), i))
    return chosen, [int(pred[i]) for i in chosen], counts


@register_setting("unsupervised")
class Unsupervised(Setting):
    def __init__(self):
        self.truth: dict[str, int] = {}

    def check(self, cfg) -> None:
        if cfg.manifest:
            raise ValueError("data.manifest cannot be combined with data.setting=unsupervised: the "
                             "training images are chosen by the zero-shot model, not sampled")

    def check_method(self, cfg, method: type) -> None:
        if cfg.shots > 0 or method.learns_unlabelled:
            return
        from adapt.methods import get_method, list_methods

        able = [m for m in list_methods() if get_method(m).learns_unlabelled]
        raise ValueError(f"method {method.name!r} trains on labels, but data.setting=unsupervised with data.shots "
                         "<= 0 gives it none (the whole pool unlabelled, for a method that labels it itself: "
                         f"{', '.join(able)}); set data.shots >= 1 to train on the zero-shot model's N most "
                         "confident pseudo-labels per class (UPL uses 16)")

    def plan(self, cfg, dataset, seed) -> Plan:
        names = list(dataset.classnames)
        # every training image, unlabelled (-1: a loss on them fails loudly until ``prepare`` has
        # pseudo-labelled them); the true labels are kept aside for the reported accuracy only
        folder = cfg.unlabelled.folder if cfg.unlabelled is not None else None
        if folder:  # the user's own unlabelled images: no truth to report against
            self.truth = {}
            pool = [Item(path, -1) for path in unlabelled_folder_paths(folder)]
        else:
            self.truth = {it.path: it.label for it in dataset.train}
            pool = [Item(it.path, -1) for it in dataset.train]
        return Plan(pool, names, [], OrderedDict(test=(names, list(dataset.test))))

    def prepare(self, data, backbone, device) -> dict:
        from adapt.methods.base import zero_shot_text_features

        pool = list(data.train_items)
        source = data.cfg.unlabelled.folder or "the training split, labels dropped"
        if data.cfg.shots <= 0:  # the method labels the pool itself, batch by batch
            data.write_manifest(pool, [], extra={"labels": "none (unlabelled; the method makes its own targets)"})
            return {"unlabelled": {"pool": len(pool), "source": source}}
        feats = data.encode(backbone, pool, data.test_transform(), split="train", device=device).features[0]
        with torch.no_grad():
            text = zero_shot_text_features(backbone, data.train_classnames, data.templates[:1])
            logits = backbone.logits(feats.to(text.device, text.dtype), text)
            probs = logits.float().softmax(dim=-1).cpu()
        n = data.cfg.shots
        chosen, labels, counts = select_confident(probs, n)
        data.train_items = [Item(pool[i].path, y) for i, y in zip(chosen, labels)]
        if not data.train_items:
            raise ValueError("the zero-shot model gave no pseudo-labels")
        data.write_manifest(data.train_items, [], extra={"labels": "pseudo (zero-shot top-N per class)"})
        short = {data.train_classnames[c]: k for c, k in enumerate(counts) if k < n}
        report = {"per_class": n, "selected": len(chosen), "pool": len(pool), "source": source,
                  "classes_with_fewer": short}
        if self.truth:  # the training split's labels, read for these two numbers only
            truth = [self.truth[pool[i].path] for i in chosen]
            report["accuracy"] = 100.0 * sum(int(a == b) for a, b in zip(labels, truth)) / len(labels)
            pool_truth = torch.tensor([self.truth[it.path] for it in pool])
            report["zero_shot_pool_accuracy"] = 100.0 * float((probs.argmax(1) == pool_truth).float().mean())
        return {"pseudo_labels": report}

