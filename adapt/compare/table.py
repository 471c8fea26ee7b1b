"""Many runs -> one comparison: rows per run (CSV / JSON) and mean ± std tables per group (Markdown).

Runs are grouped by (dataset, setting, shots); within a group one row per method configuration
(method name, plus the recipe hash when one method appears with several configurations). Metric
columns are whatever the runs' ``results.json`` hold under ``metrics`` (and ``scalars``, the
methods' named scalars), so a new method's numbers appear without changes here.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

from adapt.compare.runs import Missing, RunRecord

# the order columns are shown in; any other metric follows, sorted
KNOWN = ("base_acc", "novel_acc", "hm", "test_acc", "test_map", "test_miou")
LABELS = {"base_acc": "base", "novel_acc": "novel", "hm": "HM", "test_acc": "test", "hm_of_means": "HM of means",
          "test_map": "test mAP", "test_miou": "test mIoU"}
# the task kinds' primary metrics (adapt/tasks/): higher is better, so a column of them has a best
SCORES = ("acc", "map", "miou")
ZERO_SHOT = "zero-shot"


def run_row(record: RunRecord) -> dict:
    """One flat CSV / JSON row of a run: identity, every metric, size, time, provenance."""
    r = record.results
    row = {"method": r.get("method"), "dataset": r.get("dataset"), "setting": r.get("setting"),
           "shots": r.get("shots"), "seed": r.get("seed")}
    row.update(_numbers(r))
    for key, value in (r.get("zeroshot_metrics") or {}).items():
        row[f"zeroshot_{key}"] = value
    row.update({"trainable_params": r.get("trainable_params"),
                "fit_seconds": (r.get("timing") or {}).get("fit_seconds"),
                "recipe_hash": record.recipe_hash, "label": record.label,
                "adapter_dir": r.get("adapter_dir", ""), "run_dir": str(record.run_dir)})
    return row


def _numbers(results: dict) -> dict[str, float]:
    out = {k: v for k, v in (results.get("metrics") or {}).items() if _is_number(v)}
    out.update({k: v for k, v in (results.get("scalars") or {}).items() if _is_number(v) and k not in out})
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Stat:
    mean: float
    std: Optional[float]  # None for a single value (no spread to speak of)
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Stat"]:
        values = [float(v) for v in values]
        if not values:
            return None
        return cls(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def text(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


@dataclass
class Row:
    name: str
    seeds: list[int]
    stats: dict[str, Stat]
    trainable_params: Optional[int] = None
    fit_seconds: Optional[Stat] = None
    missing_seeds: list[int] = field(default_factory=list)


@dataclass
class Group:
    dataset: str
    setting: str
    shots: int
    seeds: list[int]
    columns: list[str]
    rows: list[Row]

    @property
    def title(self) -> str:
        return f"{self.dataset} · {self.setting} · {self.shots} shots"


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def aggregate(records: Sequence[RunRecord], expected_seeds: Sequence[int] = ()) -> list[Group]:
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        r = rec.results
        groups.setdefault((r.get("dataset"), r.get("setting"), r.get("shots")), []).append(rec)
    out = []
    for (dataset, setting, shots), recs in groups.items():
        seeds = sorted(set(expected_seeds) | {rec.results.get("seed") for rec in recs})
        metric_keys = {k for rec in recs for k in _numbers(rec.results)}
        columns = [k for k in KNOWN if k in metric_keys] + sorted(metric_keys - set(KNOWN))
        if {"base_acc", "novel_acc"} <= metric_keys:
            columns.insert(columns.index("hm") + 1 if "hm" in columns else len(columns), "hm_of_means")
        rows = [r for r in (_zero_shot_row(recs, columns),) if r] + _method_rows(recs, columns, seeds)
        out.append(Group(dataset, setting, shots, seeds, columns, rows))
    return out


def _stats(per_seed: dict[int, dict[str, float]], columns: list[str]) -> dict[str, Stat]:
    stats = {k: Stat.of([m[k] for m in per_seed.values() if k in m]) for k in columns if k != "hm_of_means"}
    stats = {k: s for k, s in stats.items() if s is not None}
    if "base_acc" in stats and "novel_acc" in stats:
        stats["hm_of_means"] = Stat(_harmonic(stats["base_acc"].mean, stats["novel_acc"].mean), None, 1)
    return stats


def _zero_shot_row(recs: list[RunRecord], columns: list[str]) -> Optional[Row]:
    """Zero-shot: its own runs if the comparison has them, else the baselines computed beside
    the methods (one value per seed; the test images do not depend on the seed)."""
    per_seed: dict[int, dict[str, float]] = {}
    for rec in recs:
        r = rec.results
        values = _numbers(r) if r.get("method") == "zeroshot" else r.get("zeroshot_metrics")
        if values:
            per_seed.setdefault(r.get("seed"), dict(values))
    if not per_seed:
        return None
    return Row(ZERO_SHOT, sorted(per_seed), _stats(per_seed, columns), trainable_params=0)


def _method_rows(recs: list[RunRecord], columns: list[str], seeds: list[int]) -> list[Row]:
    by_method: dict[str, dict[str, list[RunRecord]]] = {}
    for rec in recs:
        if rec.results.get("method") == "zeroshot":
            continue
        by_method.setdefault(rec.results.get("method"), {}).setdefault(rec.recipe_hash, []).append(rec)
    rows = []
    for method, configs in by_method.items():
        for h, group in configs.items():
            name = method if len(configs) == 1 else f"{method} ({group[0].label or h})"
            per_seed = {rec.results.get("seed"): _numbers(rec.results) for rec in group}
            fit = [rec.results.get("timing", {}).get("fit_seconds") for rec in group]
            rows.append(Row(name, sorted(per_seed), _stats(per_seed, columns),
                            trainable_params=group[0].results.get("trainable_params"),
                            fit_seconds=Stat.of([f for f in fit if f is not None]),
                            missing_seeds=[s for s in seeds if s not in per_seed]))
    return rows


def _best(group: Group, column: str) -> Optional[float]:
    """Best mean of a score column: accuracy, HM, mAP, mIoU (others, e.g. a searched alpha,
    have no "best")."""
    if not (column.endswith(SCORES) or column.startswith("hm")):
        return None
    means = [r.stats[column].mean for r in group.rows if column in r.stats]
    return max(means) if means else None


def markdown(groups: Sequence[Group], missing: Sequence[Missing] = ()) -> str:
    lines = []
    for g in groups:
        lines += [f"## {g.title}", "",
                  f"Mean ± std over seeds ({', '.join(map(str, g.seeds))}; {len(g.seeds)} seeds); "
                  "scores in %. **Bold**: best per column."]
        if "hm_of_means" in g.columns:
            lines.append("Two harmonic-mean conventions: **HM** is the mean ± std of the per-seed "
                         "harmonic means of base and novel; **HM of means** is the harmonic mean of the "
                         "mean base and mean novel accuracies (the number papers usually tabulate).")
        header = ["method"] + [LABELS.get(c, c) for c in g.columns] + ["seeds", "trainable params", "fit s"]
        lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        best = {c: _best(g, c) for c in g.columns}
        for row in g.rows:
            cells = [row.name]
            for c in g.columns:
                s = row.stats.get(c)
                text = s.text() if s else "–"
                cells.append(f"**{text}**" if s and best[c] is not None and round(s.mean, 1) == round(best[c], 1) else text)
            cells += [str(len(row.seeds)), f"{row.trainable_params:,}" if row.trainable_params is not None else "",
                      row.fit_seconds.text() if row.fit_seconds else ""]
            lines.append("| " + " | ".join(cells) + " |")
        zs = next((r for r in g.rows if r.name == ZERO_SHOT), None)
        if zs is not None and len(zs.seeds) < len(g.seeds):
            lines += ["", f"{ZERO_SHOT}: computed beside the methods on seed(s) {', '.join(map(str, zs.seeds))}; "
                      "it trains nothing, and the test images are the same for every seed."]
        gaps = [f"{r.name}: seed {', '.join(map(str, r.missing_seeds))}" for r in g.rows if r.missing_seeds]
        lines += ["", "Missing runs: " + ("; ".join(gaps) if gaps else "none") + ".", ""]
    failed = [f"- {m.label} seed {m.seed}: {m.reason}" for m in missing]
    if failed:
        lines += ["## Runs that did not finish", ""] + failed + [""]
    return "\n".join(lines)


def to_csv(rows: Sequence[dict]) -> str:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_json(groups: Sequence[Group], rows: Sequence[dict], missing: Sequence[Missing]) -> dict:
    def stat(s: Stat) -> dict:
        return {"mean": s.mean, "std": s.std, "n": s.n}

    return {
        "runs": list(rows),
        "tables": [{"dataset": g.dataset, "setting": g.setting, "shots": g.shots, "seeds": g.seeds,
                    "columns": g.columns,
                    "rows": [{"name": r.name, "seeds": r.seeds, "missing_seeds": r.missing_seeds,
                              "trainable_params": r.trainable_params,
                              "fit_seconds": stat(r.fit_seconds) if r.fit_seconds else None,
                              "metrics": {k: stat(v) for k, v in r.stats.items()}} for r in g.rows]}
                   for g in groups],
        "failed": [{"label": m.label, "seed": m.seed, "reason": m.reason} for m in missing],
    }
