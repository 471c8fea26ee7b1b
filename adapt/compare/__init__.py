"""``adapt compare`` / ``adapt report``: many runs -> comparison.md / .csv / .json / .png.

    from adapt.compare import compare, report
    compare(["recipes/coop/base2novel.yaml"], seeds=[1, 2, 3], out="cmp/")
    report(["runs/coop/*"], out="cmp/")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from adapt.compare.launcher import LauncherConfig, load_launcher, split_overrides

# runs / table (and through them the recipe machinery, torch, open_clip) are imported where they
# are used: `adapt compare --executor ray` starts its Ray cluster before this process pays those
# imports (ray_executor.prestart), so both happen at once

FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png")


def compare(recipes: Sequence[str | Path], seeds: Sequence[int] = (1, 2, 3), out: str | Path = "comparison",
            overrides: Sequence[str] = (), fit: Optional[Callable] = None, progress: bool = True,
            launcher: Optional[LauncherConfig] = None, dry_run: bool = False) -> dict:
    """Run every recipe x seed not already finished under ``out/runs`` (under ``launcher``'s
    executor: here by default, Ray, SLURM), then write the comparison files into ``out``.
    ``launcher.*`` overrides configure the executor; ``fit`` replaces ``run_fit`` (tests).
    Returns {"files": [...], "trained": N, "missing": [...], "records": [...]}; with ``dry_run``
    {"pending": [...], "sbatch": script or None} and nothing runs."""
    from adapt.compare.runs import expand_recipes, plan_runs, run_all

    overrides, launcher_overrides = split_overrides(overrides)
    if launcher is None:
        launcher = load_launcher(recipes, launcher_overrides)
    # workers elsewhere (a Ray cluster joined, SLURM nodes) may start in another directory
    out = Path(out) if launcher.executor == "local" else Path(out).absolute()
    plan = plan_runs(expand_recipes(recipes), list(seeds), out, overrides)
    if dry_run:
        return dry_run_plan(plan, launcher, out)
    records, missing, trained = run_all(plan, fit, progress=progress, launcher=launcher, out=out)
    files = write_comparison(records, out, missing, expected_seeds=seeds)
    _log_to_wandb(plan, out)
    return {"files": files, "trained": trained, "missing": missing, "records": records}


def dry_run_plan(plan, launcher: LauncherConfig, out: Path) -> dict:
    """The runs that would run (finished ones are skipped), and under SLURM the array's script."""
    from adapt.compare.execute import Job
    from adapt.compare.runs import finished

    pending = [Job(i, label, seed, recipe, run_dir) for i, (label, seed, recipe, run_dir) in enumerate(plan.items)
               if finished(run_dir, recipe) is None]
    script = None
    if launcher.executor == "slurm" and pending:
        from adapt.compare.slurm_executor import render_sbatch

        script = render_sbatch(pending, launcher, out)
    return {"pending": pending, "sbatch": script, "reused": len(plan.items) - len(pending)}


def report(targets: Sequence[str], out: str | Path = ".") -> dict:
    from adapt.compare.runs import collect

    records = collect(targets)
    return {"files": write_comparison(records, Path(out)), "records": records}


def write_comparison(records: Sequence, out: Path, missing: Sequence = (),
                     expected_seeds: Sequence[int] = ()) -> list[Path]:
    from adapt.compare.plot import plot
    from adapt.compare.table import aggregate, markdown, run_row, to_csv, to_json
    from adapt.io import atomic_save, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    groups = aggregate(records, expected_seeds)
    rows = [run_row(r) for r in records]
    texts = {"comparison.md": markdown(groups, missing), "comparison.csv": to_csv(rows),
             "comparison.json": json.dumps(to_json(groups, rows, missing), indent=2)}
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    if groups:
        atomic_save(out / "comparison.png", lambda p: plot(groups, p))
    return [out / name for name in FILES if (out / name).exists()]


def _log_to_wandb(plan, out: Path) -> None:
    """With ``logger.wandb=true``: the comparison's rows as a wandb Table (offline by default)."""
    if not plan.items or not plan.items[0][2].logger.wandb:
        return
    import csv

    import wandb

    logger = plan.items[0][2].logger
    rows = list(csv.reader(open(out / "comparison.csv")))
    run = wandb.init(project=logger.project, mode=logger.mode, dir=str(out), name=f"compare {out.name}",
                     job_type="compare", reinit=True)
    run.log({"comparison": wandb.Table(columns=rows[0], data=rows[1:])})
    run.finish()
