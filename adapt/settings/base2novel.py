"""``base2novel`` (CoCoOp): train on the base half of the classes, evaluate on base and novel."""
from __future__ import annotations

from collections import OrderedDict

from adapt.data.splits import subsample_classes
from adapt.settings.base import Plan, Setting
from adapt.settings.registry import register_setting


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


@register_setting("base2novel")
class BaseToNovel(Setting):
    """Sorted label ids, base = the first ceil(n/2), novel = the rest, each relabelled 0..k-1.
    The K-shot sample is drawn over all classes first, as CoOp's code does, so a seed picks the
    same base images as in the ``all`` setting."""

    def plan(self, cfg, dataset, seed) -> Plan:
        names = dataset.classnames
        if len(names) < 2:
            raise ValueError(f"data.setting=base2novel needs at least 2 classes; {dataset.name!r} has {len(names)}")
        train, val = self.sample(cfg, dataset, seed)
        base_train, base_names = subsample_classes(train, names, "base")
        base_val, _ = subsample_classes(val, names, "base")
        evals = OrderedDict()
        for subset in ("base", "novel"):
            items, subset_names = subsample_classes(dataset.test, names, subset)
            evals[subset] = (subset_names, items)
        return Plan(base_train, base_names, base_val, evals, train, val)

    def summarize(self, accs, metric: str = "acc"):
        b, n = accs["base"], accs["novel"]
        return {f"base_{metric}": b, f"novel_{metric}": n, "hm": harmonic_mean(b, n)}
