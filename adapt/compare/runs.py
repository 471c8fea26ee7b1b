"""The runs behind a comparison: recipe x seed, each in its own run directory, found again later.

``run_all`` trains what is missing and reuses what is finished: a run directory whose
``results.json`` exists and whose ``recipe.yaml`` hashes to the recipe asked for is not run again,
so an interrupted comparison resumes where it stopped, whichever executor ran it before (here, Ray,
SLURM: ``launcher.py``); the run directories are the only state. A directory holding a *different*
recipe is never overwritten. ``collect`` reads finished runs back from directories or globs
(``adapt report``).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from adapt.compare.launcher import LauncherConfig
from adapt.config import RecipeError, load_recipe
from adapt.rundir import RESUME_FREE_KEYS, _flatten

log = logging.getLogger(__name__)

def recipe_hash(recipe: DictConfig) -> str:
    """12 hex digits identifying what a recipe computes, the same for every seed of it: the keys
    a resume may change (where and how visibly a run is written) are left out, and the seed."""
    flat = _flatten(OmegaConf.to_container(recipe, resolve=True))
    kept = {k: v for k, v in flat.items() if k != "seed" and not k.startswith(RESUME_FREE_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def recipe_label(path: str | Path) -> str:
    """``recipes/coop/base2novel.yaml`` -> ``coop-base2novel``: the run folder of a recipe."""
    p = Path(path)
    parts = [p.parent.name, p.stem] if p.parent.name not in ("", ".", "recipes") else [p.stem]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


@dataclass
class RunRecord:
    """One finished run's results.json plus where it lives."""
    run_dir: Path
    results: dict
    recipe_hash: str = ""
    label: str = ""


@dataclass
class Missing:
    label: str
    seed: int
    reason: str


@dataclass
class Plan:
    """The runs a comparison asks for: (label, seed, recipe, run directory)."""
    items: list[tuple[str, int, DictConfig, Path]] = field(default_factory=list)


def expand_recipes(paths: Sequence[str | Path]) -> list[Path]:
    """Recipe files; a ``.txt`` / ``.yaml`` list file (``recipes: [...]`` or one path a line)
    contributes the recipes it names, relative to itself or to the working directory."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        names = _list_file_entries(path)
        if names is None:
            out.append(path)
            continue
        for name in names:
            candidates = [path.parent / name, Path(name), path.parent.parent / name]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise RecipeError(f"{path} names {name!r}, which is not a file (looked relative to "
                                  f"{path.parent} and to the working directory)")
            out.append(found)
    return out


def _list_file_entries(path: Path) -> Optional[list[str]]:
    if path.suffix == ".txt":
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
        return [ln for ln in lines if ln]
    if path.suffix in (".yaml", ".yml") and path.is_file():
        cfg = OmegaConf.load(path)
        if isinstance(cfg, DictConfig) and "recipes" in cfg and "method" not in cfg:
            return [str(r) for r in cfg.recipes]
    return None


def plan_runs(recipes: Sequence[Path], seeds: Sequence[int], out: Path,
              overrides: Sequence[str] = ()) -> Plan:
    """Every recipe x seed, resolved and checked up front (a typo fails before any training)."""
    plan = Plan()
    labels: dict[str, Path] = {}
    for path in recipes:
        label = recipe_label(path)
        if label in labels and labels[label] != path:
            raise RecipeError(f"{path} and {labels[label]} would share the run folder {label!r}; "
                              "compare them from separate --out directories")
        labels[label] = path
    # seed-major: a comparison cut short has every recipe on the first seeds, not some on all
    for seed in seeds:
        for label, path in labels.items():
            run_dir = out / "runs" / label / f"seed{seed}"
            extra = [f"seed={seed}", f"output_dir={out / 'runs'}", f"run_name={label}/seed{seed}",
                     "trainer.progress_bar=false", "baseline=false"]
            plan.items.append((label, seed, load_recipe(path, list(overrides) + extra), run_dir))
    mark_baselines(plan)
    return plan


# the data keys the zero-shot row depends on (the evaluation sets and prompts), or the table groups
# by (shots); keys that only shape training (batch size, augmentation, workers) are left out
BASELINE_DATA_KEYS = ("dataset", "root", "split_file", "setting", "shots", "targets", "tasks", "multi_task",
                      "templates")


def baseline_key(recipe: DictConfig) -> str:
    """One zero-shot baseline per key: the evaluation data, the prompts, the backbone."""
    data = OmegaConf.to_container(recipe.data, resolve=True)
    kept = {k: data[k] for k in BASELINE_DATA_KEYS if k in data}
    b = recipe.backbone  # the weights (memory and speed settings give the same logits)
    return json.dumps([kept, [b.name, b.pretrained, b.quick_gelu]], sort_keys=True, default=str)


def mark_baselines(plan: Plan) -> None:
    """The zero-shot row of each table: computed by one run per (evaluation data, shots, backbone:
    ``baseline_key``), the first seed's first recipe that is not zero-shot itself; none where the
    comparison runs the zero-shot recipe. Once, not per run, so concurrent runs never compute the
    same baseline twice (it trains nothing and its test images are the same for every seed)."""
    first_seed = plan.items[0][1] if plan.items else None
    own = {baseline_key(r) for _, _, r, _ in plan.items if r.method.name == "zeroshot"}
    for _, seed, recipe, _ in plan.items:
        key = baseline_key(recipe)
        if seed == first_seed and recipe.method.name != "zeroshot" and key not in own:
            recipe.baseline = True
            own.add(key)


def finished(run_dir: Path, recipe: DictConfig) -> Optional[RunRecord]:
    """The run's record when ``run_dir`` holds this recipe's finished run; None when it has not
    run (or did not finish); an error when it holds another recipe's run."""
    results, saved = run_dir / "results.json", run_dir / "recipe.yaml"
    if not saved.is_file():
        return None
    have, want = recipe_hash(OmegaConf.load(saved)), recipe_hash(recipe)
    if have != want or OmegaConf.load(saved).get("seed") != recipe.seed:
        raise RecipeError(f"{run_dir} holds a run of another recipe (hash {have}, asked for {want}); "
                          "it is left untouched: compare into another --out directory")
    if not results.is_file():
        return None
    return RunRecord(run_dir, json.loads(results.read_text()), want)


def run_all(plan: Plan, fit: Optional[Callable[[DictConfig], dict]] = None, progress: bool = True,
            launcher=None, out: Optional[Path] = None) -> tuple[list[RunRecord], list[Missing], int]:
    """Runs what is not finished under the launcher's executor (default: one after another, here);
    returns (records, missing runs, number of runs trained)."""
    from adapt.compare.execute import Job, Progress

    launcher = launcher or LauncherConfig()
    found: dict[int, RunRecord] = {}
    jobs: list[Job] = []
    for index, (label, seed, recipe, run_dir) in enumerate(plan.items):
        record = finished(run_dir, recipe)
        if record is None:
            jobs.append(Job(index, label, seed, recipe, run_dir))
        else:
            found[index] = record
    bar = Progress(jobs, reused=len(found), enabled=progress)
    outcomes = execute(jobs, fit, launcher, bar, out) if jobs else {}
    records, missing = [], []
    for index, (label, seed, recipe, run_dir) in enumerate(plan.items):
        record = found.get(index)
        if record is None:
            outcome = outcomes[index]
            if outcome.error:
                log.error("%s seed %s %s", label, seed, outcome.error)
                missing.append(Missing(label, seed, outcome.error))
                continue
            record = RunRecord(run_dir, outcome.results, recipe_hash(recipe))
        record.label = label
        records.append(record)
    return records, missing, sum(1 for o in outcomes.values() if not o.error)


def execute(jobs, fit, launcher, progress, out: Optional[Path]) -> dict:
    """The jobs' outcomes under ``launcher.executor``."""
    from adapt.compare.execute import run_local

    if launcher.executor == "ray":
        from adapt.compare.ray_executor import run_ray

        return run_ray(jobs, fit, launcher, progress)
    if launcher.executor == "slurm":
        from adapt.compare.slurm_executor import run_slurm

        return run_slurm(jobs, fit, launcher, progress, Path(out or jobs[0].run_dir.parents[2]))
    return run_local(jobs, fit, launcher, progress)


def collect(targets: Sequence[str]) -> list[RunRecord]:
    """Finished runs under run directories, parent folders or globs (each results.json found)."""
    dirs: list[Path] = []
    for target in targets:
        matches = [Path(m) for m in sorted(glob.glob(target))] or [Path(target)]
        for match in matches:
            if (match / "results.json").is_file():
                dirs.append(match)
            elif match.is_dir():
                dirs.extend(sorted(p.parent for p in match.rglob("results.json")))
    if not dirs:
        raise FileNotFoundError(f"no finished run (a folder with results.json) under {' '.join(targets)}")
    records, seen = [], set()
    for d in dirs:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        saved = d / "recipe.yaml"
        h = recipe_hash(OmegaConf.load(saved)) if saved.is_file() else ""
        records.append(RunRecord(d, json.loads((d / "results.json").read_text()), h))
    return records
