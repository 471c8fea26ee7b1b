"""comparison.png: per group, grouped bars (mean ± std per metric, one group of bars per method)
and the headline score (HM, accuracy, mAP or mIoU) against trainable parameters on a log axis (zero-shot, 0 parameters, as a line)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from adapt.compare.table import LABELS, ZERO_SHOT, Group

_BAR_COLUMNS = ("base_acc", "novel_acc", "hm", "test_acc", "test_map", "test_miou")


def _headline(group: Group) -> str:
    """The column a run is summed up by: HM for base-to-novel, else the task's test score."""
    return next((c for c in ("hm", "test_acc", "test_map", "test_miou") if c in group.columns), group.columns[0])


def plot(groups: Sequence[Group], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.2 * len(groups)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for (bars, scatter), g in zip(axes, groups):
        cols = [c for c in _BAR_COLUMNS if c in g.columns] or g.columns[:1]
        n, width = len(cols), 0.8 / max(1, len(cols))
        for j, c in enumerate(cols):
            xs = [i + (j - (n - 1) / 2) * width for i in range(len(g.rows))]
            means = [r.stats[c].mean if c in r.stats else 0.0 for r in g.rows]
            errs = [(r.stats[c].std or 0.0) if c in r.stats else 0.0 for r in g.rows]
            bars.bar(xs, means, width, yerr=errs, capsize=2, label=LABELS.get(c, c))
        bars.set_xticks(range(len(g.rows)), [r.name for r in g.rows], rotation=30, ha="right")
        bars.set_ylabel("score (%)")
        bars.set_ylim(0, 100)
        bars.grid(axis="y", alpha=0.3)
        bars.legend(ncol=n, fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
        bars.set_title(f"{g.title} (mean ± std over {len(g.seeds)} seeds)", fontsize=10, loc="left")

        key = _headline(g)
        for r in g.rows:
            if key not in r.stats:
                continue
            s = r.stats[key]
            if r.name == ZERO_SHOT or not r.trainable_params:
                scatter.axhline(s.mean, color="grey", ls="--", lw=1)
                scatter.annotate(r.name, (1, s.mean), xycoords=("axes fraction", "data"), ha="right",
                                 va="bottom", fontsize=8, color="grey")
                continue
            scatter.errorbar([r.trainable_params], [s.mean], yerr=[s.std or 0.0], fmt="o", capsize=2)
            scatter.annotate(r.name, (r.trainable_params, s.mean), textcoords="offset points",
                             xytext=(4, 4), fontsize=8)
        scatter.set_xscale("log")
        scatter.set_xlabel("trainable parameters (log)")
        scatter.set_ylabel(f"{LABELS.get(key, key)} (%)")
        scatter.grid(alpha=0.3)
        scatter.set_title(f"{LABELS.get(key, key)} vs trainable parameters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # path may be a temporary name
    plt.close(fig)
