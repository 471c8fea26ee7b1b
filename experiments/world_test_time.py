"""The test-time family on the shipped world's shifted domains, beside zero-shot.

    python experiments/world_test_time.py [--tasks world_colour world_fill ...] [--out DIR]
        [--methods zeroshot tpt tpt_coop zero tda dmn] [--seed 1]

The shipped tiny CLIP (tiny-vit-p4, tag ``world``, pretrained on the clean domain), each
method's recipes/<method>/test_time.yaml with only the backbone and dataset swapped, the first
``--test-images`` test images of each task (classes interleaved, so balanced; 0 = all).
``tpt_coop`` is TPT started from a CoOp prompt trained (recipe
coop/fewshot.yaml, 16 shots, 50 epochs) on the clean domain of the same task, the TPT paper's
ImageNet -> ImageNet-variants protocol in miniature. A sanity check, not a paper reproduction:
no direction is asserted where the world gives none. Writes world_test_time.json and .md to
--out (default: a new temporary folder).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt.config import load_recipe  # noqa: E402
from adapt.run import Experiment, run_fit, test_time_record  # noqa: E402

TASKS = ["world_colour", "world_colour_noisy", "world_colour_clutter", "world_colour_sketch",
         "world_fill", "world_fill_dusk", "world_fill_clutter"]
METHODS = ["zeroshot", "tpt", "tpt_coop", "zero", "tda", "dmn"]
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.root=null", "data.num_workers=0",
         "trainer.progress_bar=false", "logger.csv=false"]


def clean_task(task: str) -> str:
    return task.split("_")[0] + "_" + task.split("_")[1] + "_clean"


def coop_run(task: str, seed: int, out: Path) -> str:
    recipe = load_recipe(ROOT / "recipes/coop/fewshot.yaml", WORLD + [
        f"data.dataset={clean_task(task)}", "data.shots=16", "trainer.max_epochs=50", f"seed={seed}",
        f"output_dir={out}", f"run_name=coop_{clean_task(task)}_s{seed}"])
    return run_fit(recipe)["run_dir"]


def run(method: str, task: str, seed: int, out: Path, coop_dirs: dict, n_test: int) -> dict:
    name = "tpt" if method == "tpt_coop" else method
    recipe_file = ROOT / "recipes" / ("zero" if name == "zeroshot" else name) / "test_time.yaml"
    extra = [f"method.name={name}"] if name == "zeroshot" else []
    if method == "tpt":
        extra.append("method.init_from=null")
    if method == "tpt_coop":
        key = clean_task(task)
        if key not in coop_dirs:
            coop_dirs[key] = coop_run(task, seed, out)
        extra.append(f"method.init_from={coop_dirs[key]}")
    # cache=false: the test subset is encoded afresh (no cached features of the whole split)
    recipe = load_recipe(recipe_file, WORLD + extra + [f"data.dataset={task}", f"seed={seed}", f"output_dir={out}",
                                                       f"run_name={method}_{task}_s{seed}", "cache=false"])
    start = time.perf_counter()
    exp = Experiment(recipe)
    classnames, items = exp.data.eval_sets["test"]
    if n_test:  # the first n test images (the world interleaves the classes: balanced)
        exp.data.eval_sets["test"] = (classnames, items[:n_test])
    exp.setup_method()
    acc = exp.evaluate()["test"]
    return {"method": method, "task": task, "seed": seed, "test_acc": acc,
            "test_images": len(exp.data.eval_sets["test"][1]), "classes": len(classnames),
            **test_time_record(exp.method, seed), "wall_seconds": round(time.perf_counter() - start, 1)}


def table(runs: list[dict], tasks: list[str], methods: list[str]) -> list[str]:
    acc = {(r["method"], r["task"]): r["test_acc"] for r in runs}
    n = sorted({r["test_images"] for r in runs})
    lines = ["Test accuracy (%) on the world's shifted domains; shipped tiny-vit-p4 (`world`, pretrained on "
             f"`clean`), each method's test_time recipe, the first {n} test images of each task.", "",
             "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for m in methods:
        vals = [acc.get((m, t)) for t in tasks]
        done = [v for v in vals if v is not None]
        mean = f"{sum(done) / len(done):.1f}" if done else ""
        lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + f" | {mean} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--test-images", type=int, default=60, help="first N test images of each task (0 = all)")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("adapt").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="world_test_time_"))
    out.mkdir(parents=True, exist_ok=True)
    runs, coop_dirs = [], {}
    with tempfile.TemporaryDirectory(prefix="world_test_time_runs_") as tmp:
        for task in args.tasks:
            for method in args.methods:
                runs.append(run(method, task, args.seed, Path(tmp), coop_dirs, args.test_images))
                print(json.dumps(runs[-1]), flush=True)
    (out / "world_test_time.json").write_text(json.dumps({"runs": runs, "tasks": args.tasks}, indent=2))
    md = "\n".join(table(runs, args.tasks, args.methods)) + "\n"
    (out / "world_test_time.md").write_text(md)
    print(md)
    print(f"wrote {out / 'world_test_time.json'} and world_test_time.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
