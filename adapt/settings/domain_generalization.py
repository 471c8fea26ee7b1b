"""``domain_generalization``: train on a source (ImageNet), evaluate on shifted copies of its
classes (ImageNet-V2 / -Sketch / -A / -R, or the world's other rendering domains).

Each target's classes are mapped onto the source's through their identifiers (WordNet ids, or
the class names where a dataset has none) and named with the source's class names; a target
that covers only some classes (the 200 of -A and -R) is evaluated over those classes only.
Results: one accuracy per target plus their mean, as in ``cross_dataset``.
"""
from __future__ import annotations

from adapt.data.items import DatasetSplits, Item
from adapt.settings.cross_dataset import CrossDataset, absolute
from adapt.settings.registry import register_setting


def class_map(source: DatasetSplits, target: DatasetSplits) -> list[int]:
    """For each target class, the source label of the same class."""
    src = source.class_ids or source.classnames
    tgt = target.class_ids or target.classnames
    index = {c: i for i, c in enumerate(src)}
    unknown = [c for c in tgt if c not in index]
    if unknown:
        raise ValueError(f"domain generalization from {source.name!r} to {target.name!r}: {len(unknown)} "
                         f"target class(es) are not source classes, e.g. {unknown[:3]}; use "
                         f"data.setting=cross_dataset for targets with other classes")
    return [index[c] for c in tgt]


@register_setting("domain_generalization")
class DomainGeneralization(CrossDataset):
    def __init__(self):
        self.class_maps: dict[str, list[int]] = {}

    def target_set(self, source: DatasetSplits, target: DatasetSplits) -> tuple[list[str], list[Item]]:
        mapping = class_map(source, target)
        self.class_maps[target.name] = mapping
        return [source.classnames[i] for i in mapping], absolute(target, target.test)

    def plan(self, cfg, dataset, seed):
        plan = super().plan(cfg, dataset, seed)
        # which source class each target label is, for whoever reads the manifest
        plan.extra["target_source_labels"] = dict(self.class_maps)
        return plan
