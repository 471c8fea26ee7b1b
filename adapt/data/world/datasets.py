"""Dataset-registry entries for the world tasks (``world_colour``, ``world_fill``, ...).

Each loader materialises its task on first use and then hands the folder to a generic loader
(``zhou`` for one-object tasks, ``multilabel_csv`` for multi-object ones), so the world's datasets
go through exactly the code path of a downloaded dataset.
"""
from __future__ import annotations

import dataclasses

from adapt.data.config import DataConfig
from adapt.data.items import DatasetSplits
from adapt.data.folder import dataset_templates
from adapt.data.registry import build_dataset, register_dataset
from adapt.data.world.build import materialise, split_file_name
from adapt.data.world.multi import MULTI_TASKS
from adapt.data.world.tasks import TASKS, WorldTask


def _loader(task: WorldTask):
    def load(cfg: DataConfig) -> DatasetSplits:
        folder = materialise(task, root=cfg.root)
        splits = build_dataset(dataclasses.replace(
            cfg, dataset=task.loader, root=str(folder), split_file=split_file_name(task),
            classnames_file=task.classnames_file))
        splits.name = task.name
        splits.templates = dataset_templates(cfg, [task.template])
        if splits.classnames != task.classnames:
            raise RuntimeError(f"{folder}: class names {splits.classnames} do not match the "
                               f"world task's {task.classnames}")
        return splits

    load.__name__ = f"load_{task.name}"
    load.__doc__ = f"World task {task.name!r} in domain {task.domain!r}."
    return load


for _name, _task in {**TASKS, **MULTI_TASKS}.items():
    register_dataset(_name)(_loader(_task))
