"""``multi_task`` (MVLPT, SoftCPT): several datasets trained at once, evaluated one by one.

Each task is sampled on its own, exactly as a single-task run of it with the same seed samples
it (so "trained together vs each alone" compares the same images), then the samples are joined
(adapt/data/multitask.py): one training set over the union of the classes, one evaluation set
per task with that task's own classes and templates, its results under the task's name and
their mean. With ``data.multi_task.base2novel`` each task's classes are split as in
``base2novel`` (base = the first half of its sorted labels); the model trains on every task's
base half and each task's base and novel halves are evaluated.

Sampling mixes the tasks as both originals do: one random order over the concatenated sample,
so a task weighs in proportion to its classes x shots.

Results: ``<task>_acc`` per task and ``test_acc`` their mean (per-task base-to-novel:
``<task>_base_acc``, ``<task>_novel_acc``, ``<task>_hm``; ``base_acc`` / ``novel_acc`` the means,
``hm`` their harmonic mean, as the field's average rows are computed).
"""
from __future__ import annotations

from collections import OrderedDict

from adapt.data.fewshot import few_shot_splits
from adapt.data.multitask import JointDataset, join_tasks, task_specs
from adapt.data.registry import build_dataset
from adapt.data.splits import subsample_classes, subset_labels
from adapt.settings.base import Plan, Setting
from adapt.settings.base2novel import harmonic_mean
from adapt.settings.registry import register_setting

SUBSETS = ("base", "novel")


@register_setting("multi_task")
class MultiTask(Setting):
    def __init__(self):
        self.joint: JointDataset | None = None

    def check(self, cfg) -> None:
        if not cfg.tasks:
            raise ValueError(f"data.setting={self.name} needs data.tasks: the datasets trained together with "
                             f"data.dataset, e.g. data.tasks=[world_fill]")
        task_specs(cfg)

    def check_method(self, cfg, method) -> None:
        if cfg.multi_task.classifier == "per_task" and not method.per_task_loss:
            raise ValueError(f"{method.name}'s loss compares its logits over every class with another "
                             f"distribution, which data.multi_task.classifier=per_task makes infinite (the "
                             f"classes outside an image's task are -inf); use classifier=union")

    def dataset(self, cfg):
        specs = task_specs(cfg)
        datasets = [build_dataset(spec.data) for spec in specs]
        for spec, ds in zip(specs, datasets):
            super().check_dataset(spec.data, ds)
        self.joint = join_tasks([s.name for s in specs], datasets, cfg.multi_task.classifier)
        return self.joint.joint

    def check_dataset(self, cfg, dataset) -> None:
        """Each task was checked as it was loaded (``dataset``)."""

    def plan(self, cfg, dataset, seed) -> Plan:
        joint = self.joint
        if cfg.manifest is not None:  # the joint sample as an earlier run drew it
            train, val = few_shot_splits(dataset, cfg.shots, seed, cfg.allow_fewer_shots, cfg.manifest)
        else:  # each task as its own run would draw it
            train, val = [], []
            for t, ds in enumerate(joint.datasets):
                t_train, t_val = few_shot_splits(ds, cfg.shots, seed, cfg.allow_fewer_shots)
                train += joint.joint_items(t, t_train)
                val += joint.joint_items(t, t_val)
        class_tasks = joint.class_tasks
        names = list(dataset.classnames)
        evals: "OrderedDict" = OrderedDict()
        eval_tasks, templates = {}, {}
        for t, (task, ds) in enumerate(zip(joint.names, joint.datasets)):
            test = joint.local_items(t, ds.test)
            subsets = {task: (test, list(ds.classnames))}
            if cfg.multi_task.base2novel:
                subsets = {f"{task}_{s}": subsample_classes(test, ds.classnames, s) for s in SUBSETS}
            for set_name, (items, set_classes) in subsets.items():
                evals[set_name] = (list(set_classes), list(items))
                eval_tasks[set_name] = task
                templates[set_name] = list(ds.templates)
        train_names, train_items, val_items = names, train, val
        if cfg.multi_task.base2novel:  # every task's base half, in joint labels
            keep = [c for t, ds in enumerate(joint.datasets)
                    for c in _base_labels(len(ds.classnames), joint.offsets[t])]
            relabel = {old: new for new, old in enumerate(keep)}
            train_items = [type(it)(it.path, relabel[it.label]) for it in train if it.label in relabel]
            val_items = [type(it)(it.path, relabel[it.label]) for it in val if it.label in relabel]
            train_names = [names[c] for c in keep]
            class_tasks = [class_tasks[c] for c in keep]
        extra = {"tasks": {name: {"dataset": ds.name, "classes": len(ds.classnames), "offset": off}
                           for name, ds, off in zip(joint.names, joint.datasets, joint.offsets)},
                 "classifier": cfg.multi_task.classifier}
        return Plan(train_items, train_names, val_items, evals, train, val, extra, templates,
                    class_tasks=class_tasks, eval_tasks=eval_tasks)

    def summarize(self, accs, metric: str = "acc"):
        if not all(k.endswith(("_base", "_novel")) for k in accs):  # task names never end so
            out = {f"{k}_{metric}": v for k, v in accs.items()}
            out[f"test_{metric}"] = sum(accs.values()) / len(accs)
            return out
        joint_names = list(dict.fromkeys(k.rsplit("_", 1)[0] for k in accs))
        out = {}
        for task in joint_names:
            b, n = accs[f"{task}_base"], accs[f"{task}_novel"]
            out.update({f"{task}_base_{metric}": b, f"{task}_novel_{metric}": n, f"{task}_hm": harmonic_mean(b, n)})
        base = sum(accs[f"{t}_base"] for t in joint_names) / len(joint_names)
        novel = sum(accs[f"{t}_novel"] for t in joint_names) / len(joint_names)
        out.update({f"base_{metric}": base, f"novel_{metric}": novel, "hm": harmonic_mean(base, novel)})
        return out


def _base_labels(n: int, offset: int) -> list[int]:
    """The joint labels of a task's base half (``subset_labels``' rule: the first ceil(n/2))."""
    return [offset + c for c in subset_labels(n, "base")]
