"""The offline world's reference numbers for the README: zero-shot accuracy of the shipped tiny
CLIP on every downstream task, and the quickstart (CoOp, 16 shots, base-to-novel) per seed.

    python experiments/world_numbers.py [--seeds 1 2 3] [--out experiments/results]

Writes world_numbers.json and world_numbers.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from adapt.config import load_recipe
from adapt.run import run_fit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TASKS = ["world_colour", "world_fill"]
QUIET = ["trainer.progress_bar=false", "logger.csv=false"]


def zero_shot(task: str, out: Path) -> dict:
    recipe = load_recipe(QUICKSTART, QUIET + [
        "method.name=zeroshot", f"data.dataset={task}", "data.setting=all", f"output_dir={out}",
        "baseline=false"])
    res = run_fit(recipe)
    return {"test_acc": res["metrics"]["test_acc"], "classes": res["classes"]["test"],
            "chance": 100.0 / res["classes"]["test"]}


def quickstart(seed: int, out: Path) -> dict:
    start = time.perf_counter()
    res = run_fit(load_recipe(QUICKSTART, QUIET + [f"seed={seed}", f"output_dir={out}"]))
    return {"seed": seed, "coop": res["metrics"], "zeroshot": res["zeroshot_metrics"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def cold_cli_run(tmp: Path) -> float:
    """Wall seconds of the README's command ``adapt fit recipes/quickstart.yaml`` in a fresh
    process with empty caches (the world is rendered and its features encoded from scratch)."""
    env = dict(os.environ, ADAPT_CACHE_DIR=str(tmp / "cache"), ADAPT_WORLD_CACHE=str(tmp / "world"))
    start = time.perf_counter()
    subprocess.run(["adapt", "fit", str(QUICKSTART), f"output_dir={tmp / 'cold'}"], env=env, check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 1)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        zs = {task: zero_shot(task, Path(tmp) / "zs") for task in TASKS}
        runs = [quickstart(seed, Path(tmp) / "qs") for seed in args.seeds]
        cold = cold_cli_run(Path(tmp))
    results = {"recipe": str(QUICKSTART.relative_to(ROOT)), "zero_shot": zs, "quickstart": runs,
               "cold_cli_seconds": cold}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world_numbers.json").write_text(json.dumps(results, indent=2))
    lines = ["| task | classes | chance | zero-shot (test) |", "|---|---|---|---|"]
    lines += [f"| {t} | {z['classes']} | {z['chance']:.1f} | {z['test_acc']:.1f} |" for t, z in zs.items()]
    lines += ["", f"Quickstart (CoOp, 16 shots, base-to-novel), seeds {args.seeds}:", "",
              "| | base | novel | HM |", "|---|---|---|---|"]
    for label, key in (("zero-shot", "zeroshot"), ("CoOp", "coop")):
        cols = [mean_std([r[key][m] for r in runs]) for m in ("base_acc", "novel_acc", "hm")]
        lines.append(f"| {label} | {' | '.join(cols)} |")
    lines += ["", f"Wall time per quickstart run (in-process, warm caches): "
              f"{mean_std([r['wall_seconds'] for r in runs])} s; `adapt fit recipes/quickstart.yaml` "
              f"in a fresh process with empty caches: {cold} s"]
    (args.out / "world_numbers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
