"""Multi-task prompt tuning on the world: world_colour (12 colours) and world_fill (5 fills)
trained together (``data.setting: multi_task``) against each trained alone, per task and mean.

Rows, each at 16 shots on the shipped tiny CLIP (tiny-vit-p4, tag ``world``):
- CoOp: 4 context vectors from "a photo of a"; one softmax over the 17 classes when together.
- MVLPT's MCoOp: 4 random context vectors, the class name in the middle; union softmax
  (recipes/mvlpt/world_source.yaml).
- SoftCPT: task-name prompts through its generator; each image against its own task's classes
  (recipes/softcpt/world.yaml). Alone, its one task has an empty name (its docstring).
A seed samples the same images of a task whether it trains alone or together (the setting
samples every task as its own run would).

Shortened for a CPU run: ``--epochs`` 20 for every run (the recipes: 200 / 50).

    python experiments/multitask_world.py [--seeds 1 2 3] [--epochs 20] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one. Writes multitask_world.json and
multitask_world.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt.config import load_recipe  # noqa: E402
from adapt.run import run_fit  # noqa: E402
from experiments.benchlib import output_dir, write_result  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "multitask_world"
TASKS = ("world_colour", "world_fill")
COMMON = ["data.root=null", "data.num_workers=0", "data.shots=16", "trainer.progress_bar=false", "logger.csv=false"]
WORLD_COOP = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "method.n_ctx=4",
              "method.ctx_init='a photo of a'"]
ROWS = {  # label -> (recipe, its overrides, multi_task classifier)
    "CoOp": ("coop/fewshot.yaml", WORLD_COOP, "union"),
    "MVLPT (MCoOp)": ("mvlpt/world_source.yaml", [], "union"),
    "SoftCPT": ("softcpt/world.yaml", [], "per_task"),
}


def fit(recipe: str, over: list[str], out: Path, name: str) -> tuple[dict, float]:
    cfg = load_recipe(ROOT / "recipes" / recipe, COMMON + over + [f"output_dir={out}", f"run_name={name}"])
    start = time.perf_counter()
    return run_fit(cfg), time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=20, help="epochs of every run (the recipes: 200 / 50)")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.seeds != [1, 2, 3] or args.epochs != 20, STEM)
    start = time.perf_counter()
    runs: dict = {label: {"together": [], "alone": []} for label in ROWS}
    zeroshot: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, (recipe, over, classifier) in ROWS.items():
                base = over + [f"seed={seed}", f"trainer.max_epochs={args.epochs}"]
                res, secs = fit(recipe, base + ["data.dataset=world_colour", "data.setting=multi_task",
                                                "data.tasks=[world_fill]", f"data.multi_task.classifier={classifier}",
                                                f"baseline={'true' if not zeroshot else 'false'}"],
                                Path(tmp), f"{label}-together-{seed}")
                zeroshot = zeroshot or {t: res["zeroshot_metrics"][f"{t}_acc"] for t in TASKS}
                runs[label]["together"].append({**{t: res["metrics"][f"{t}_acc"] for t in TASKS}, "seconds": secs,
                                                "trainable_params": res["trainable_params"]})
                alone = {"seconds": 0.0}
                for task in TASKS:
                    res, secs = fit(recipe, base + [f"data.dataset={task}", "data.setting=all", "data.tasks=[]",
                                                    "baseline=false"], Path(tmp), f"{label}-{task}-{seed}")
                    alone[task] = res["metrics"]["test_acc"]
                    alone["seconds"] += secs
                runs[label]["alone"].append(alone)
                print(seed, label, runs[label]["together"][-1], alone, flush=True)
    lines = [f"world_colour (12 colours) and world_fill (5 fills), 16 shots, shipped tiny-vit-p4 (`world`); seeds "
             f"{args.seeds}; {args.epochs} epochs per run; test accuracy in % (mean ± sd over seeds). Together: one "
             "`data.setting: multi_task` run over both tasks; alone: one run per task (the same images per seed).", "",
             "| method | trained | world_colour | world_fill | mean | s (both tasks) |",
             "|---|---|---:|---:|---:|---:|",
             f"| zero-shot | | {zeroshot['world_colour']:.1f} | {zeroshot['world_fill']:.1f} | "
             f"{statistics.mean(zeroshot.values()):.1f} | |"]
    for label, by in runs.items():
        for how in ("together", "alone"):
            rs = by[how]
            lines.append(f"| {label} | {how} | {mean_std([r['world_colour'] for r in rs])} | "
                         f"{mean_std([r['world_fill'] for r in rs])} | "
                         f"{mean_std([statistics.mean(r[t] for t in TASKS) for r in rs])} | "
                         f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "Recipes: `recipes/coop/fewshot.yaml` (world overrides), `recipes/mvlpt/world_source.yaml`, "
              "`recipes/softcpt/world.yaml`.", f"Command: `python experiments/{STEM}.py`"]
    result = {"seeds": args.seeds, "epochs": args.epochs, "zeroshot": zeroshot, "runs": runs,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
