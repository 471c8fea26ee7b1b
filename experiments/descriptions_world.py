"""CuPL and VCD on the world: classifiers from class descriptions beside the template's zero-shot.

world_colour (12 colours, "dusk" domain) and world_fill (5 fill patterns, "noisy" domain), the
shipped tiny CLIP (tiny-vit-p4, tag ``world``), test accuracy. Nothing is trained: each seed is
the seed of the world's description generator (adapt/data/world/descriptions.py), which writes
the files of every mode for that seed: ``faithful`` (captions naming the class's attribute),
``noisy`` (30 % of them name a wrong value), ``random`` (the name and random words of the other
attributes: WaffleCLIP's control). CuPL reads 30 sentences per class, VCD 6 descriptors; "both"
is CuPL's sentences and the dataset's template in one mean; "mean_score" is CuPL's sentences
under VCD's aggregation.

    python experiments/descriptions_world.py [--seeds 1 2 3] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one. Writes descriptions_world.json
and descriptions_world.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt.config import load_recipe  # noqa: E402
from adapt.data.world.descriptions import main as write_descriptions  # noqa: E402
from adapt.run import run_fit  # noqa: E402
from experiments.benchlib import output_dir, write_result  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "descriptions_world"
TASKS = ("world_colour", "world_fill")
COMMON = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.root=null", "data.shots=16",
          "data.num_workers=0", "trainer.progress_bar=false", "logger.csv=false", "baseline=false"]
# row -> (recipe, file kind, mode, extra overrides)
ROWS = {
    "CuPL": ("cupl", "descriptions", "faithful", []),
    "CuPL, both": ("cupl", "descriptions", "faithful", ["data.class_text.templates=true"]),
    "CuPL, mean_score": ("cupl", "descriptions", "faithful", ["method.aggregate=mean_score"]),
    "CuPL, noisy": ("cupl", "descriptions", "noisy", []),
    "CuPL, random": ("cupl", "descriptions", "random", []),
    "VCD": ("vcd", "descriptors", "faithful", []),
    "VCD, noisy": ("vcd", "descriptors", "noisy", []),
    "VCD, random": ("vcd", "descriptors", "random", []),
}


def files(task: str, seed: int, folder: Path) -> dict:
    """The generator's file of every (format, mode) for ``task`` and ``seed``."""
    out = {}
    for kind in ("descriptions", "descriptors"):
        for mode in ("faithful", "noisy", "random"):
            path = folder / f"{task}_{kind}_{mode}_{seed}.json"
            write_descriptions([task, str(path), "--format", kind, "--mode", mode, "--seed", str(seed)])
            out[kind, mode] = path
    return out


def accuracy(recipe: str, task: str, extra: list, out: Path, name: str) -> float:
    cfg = load_recipe(ROOT / "recipes" / recipe / "world.yaml", COMMON + extra + [
        f"data.dataset={task}", f"output_dir={out}", f"run_name={name}"])
    return run_fit(cfg)["metrics"]["test_acc"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.seeds != [1, 2, 3], STEM)
    logging.getLogger("adapt").setLevel(logging.WARNING)
    start = time.perf_counter()
    acc: dict = {task: {row: [] for row in ROWS} for task in TASKS}
    zeroshot = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for task in TASKS:
            zeroshot[task] = accuracy("cupl", task, ["method.name=zeroshot", "data.class_text.descriptions=null"],
                                      tmp, f"{task}-zeroshot")
            for seed in args.seeds:
                made = files(task, seed, tmp)
                for row, (recipe, kind, mode, extra) in ROWS.items():
                    text = [f"data.class_text.{kind}={made[kind, mode]}",
                            f"data.class_text.{'descriptors' if kind == 'descriptions' else 'descriptions'}=null"]
                    acc[task][row].append(accuracy(recipe, task, text + extra, tmp, f"{task}-{row}-{seed}"))
                    print(task, row, seed, f"{acc[task][row][-1]:.2f}", flush=True)
    lines = [f"Shipped tiny-vit-p4 (`world`), test accuracy in % (mean ± sd over the description generator's "
             f"seeds {args.seeds}); nothing is trained. zero-shot: the dataset's template "
             "(\"a photo of a {} shape.\").", "",
             "| classifier | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS),
             "| zero-shot (template) | " + " | ".join(f"{zeroshot[t]:.1f}" for t in TASKS) + " |"]
    lines += [f"| {row} | " + " | ".join(mean_std(acc[t][row]) for t in TASKS) + " |" for row in ROWS]
    lines += ["", "Recipes: `recipes/{cupl,vcd}/world.yaml`; descriptions: `python -m adapt.data.world.descriptions`.",
              f"Command: `python experiments/{STEM}.py`"]
    result = {"seeds": args.seeds, "rows": {k: list(v[:3]) + [v[3]] for k, v in ROWS.items()},
              "zeroshot": zeroshot, "accuracy": acc, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
