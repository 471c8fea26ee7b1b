"""``cross_dataset``: train on one dataset, evaluate on it and on each of ``data.targets``.

A target is a dataset name (read from ``data.root``, which may be the parent folder holding
every dataset under its usual name) or a mapping ``{dataset, root, split_file}``. Each target
keeps its own class names; the method is re-pointed at them for its evaluation. Targets are
loaded (and their images checked) before any model is built.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from adapt.data.config import DataConfig
from adapt.data.items import DatasetSplits, Item
from adapt.data.multitask import dataset_entry
from adapt.data.registry import build_dataset
from adapt.settings.base import Plan, Setting
from adapt.settings.registry import register_setting

TARGET_KEYS = ("dataset", "root", "split_file")


def target_configs(cfg: DataConfig) -> list[DataConfig]:
    """One DataConfig per ``data.targets`` entry (the source's other keys carried over)."""
    out = []
    for i, target in enumerate(cfg.targets or []):
        spec = dataset_entry(target, TARGET_KEYS, f"data.targets[{i}]")
        out.append(dataclasses.replace(cfg, dataset=spec["dataset"], root=spec.get("root", cfg.root),
                                       split_file=spec.get("split_file"), templates=None, targets=[],
                                       manifest=None, setting="all"))
    return out


def absolute(dataset: DatasetSplits, items: list[Item]) -> list[Item]:
    """A target's items with absolute paths: they are read beside the source's, whose root the
    data module joins (an absolute path survives the join)."""
    root = Path(dataset.root).expanduser().resolve()
    return [Item(str(root / it.path), it.label) for it in items]


@register_setting("cross_dataset")
class CrossDataset(Setting):
    def check(self, cfg: DataConfig) -> None:
        if not cfg.targets:
            raise ValueError(f"data.setting={self.name} needs data.targets: the datasets to evaluate on, "
                             f"e.g. data.targets=[world_fill]")
        target_configs(cfg)

    def target_set(self, source: DatasetSplits, target: DatasetSplits) -> tuple[list[str], list[Item]]:
        return list(target.classnames), absolute(target, target.test)

    def plan(self, cfg, dataset, seed) -> Plan:
        plan = super().plan(cfg, dataset, seed)
        for tcfg in target_configs(cfg):
            target = build_dataset(tcfg)
            name = target.name if target.name not in plan.eval_sets else f"{target.name}_{len(plan.eval_sets)}"
            if not target.test:
                raise ValueError(f"target {tcfg.dataset!r} at {target.root} has no test images")
            plan.eval_sets[name] = self.target_set(dataset, target)
            plan.eval_templates[name] = list(target.templates)  # each dataset's own template
        return plan

    def summarize(self, accs, metric: str = "acc"):
        targets = {k: v for k, v in accs.items() if k != "test"}
        out = {f"test_{metric}": accs["test"], **{f"{k}_{metric}": v for k, v in targets.items()}}
        out[f"target_mean_{metric}"] = sum(targets.values()) / len(targets)
        return out
