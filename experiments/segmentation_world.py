"""Segmentation on the offline world: the shipped tiny CLIP (tiny-vit-p4, tag ``world``) on
world_seg_colour (1-3 objects per image, each pixel labelled with the colour of the object seen
there, the background ignored), MaskCLIP's value path against the ordinary last-block tokens
(training-free and deterministic: one run each, the seed moves nothing), and DenseCLIP trained
on the label maps (recipes/denseclip/world.yaml) with the image tower frozen (denseclip) and
fine-tuned at 0.1x (denseclip_ft), seeds 1-3 each, reported as mean ± std.

    python experiments/segmentation_world.py [--out experiments/results] [--seeds 1 2 3] [--rows maskclip denseclip]

Writes segmentation_world.json and segmentation_world.md (a new temporary folder unless ``--out``).
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
from adapt.run import run_fit  # noqa: E402
from experiments.benchlib import output_dir, write_result  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "segmentation_world"
QUIET = ["trainer.progress_bar=false", "logger.csv=false", "data.num_workers=0"]
ROWS = {"maskclip (value path)": [], "maskclip (last-block tokens)": ["method.features=tokens"]}
# trained rows: (recipe, overrides), run once per seed
TRAINED = {"denseclip (image tower frozen)": ("denseclip", []),
           "denseclip_ft (image tower fine-tuned at 0.1x)": ("denseclip", ["method.name=denseclip_ft"])}
CLASSES = 12


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the trained rows")
    ap.add_argument("--rows", nargs="+", default=["maskclip", "denseclip"], choices=["maskclip", "denseclip"],
                    help="which methods' rows to run")
    args = ap.parse_args(argv)
    out = output_dir(args.out, set(args.rows) != {"maskclip", "denseclip"} or args.seeds != [1, 2, 3], STEM)
    start = time.perf_counter()
    runs, trained = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(ROWS.items() if "maskclip" in args.rows else ()):
            run_fit(load_recipe(ROOT / "recipes" / "maskclip" / "world.yaml",
                                QUIET + overrides + [f"output_dir={tmp}", f"run_name=r{i}"]))
            saved = json.loads((Path(tmp) / f"r{i}" / "results.json").read_text())
            runs[label] = {"overrides": overrides, "metrics": saved["task_metrics"]["test"]}
            print(label, runs[label], flush=True)
        for j, (label, (recipe, overrides)) in enumerate(TRAINED.items() if "denseclip" in args.rows else ()):
            seeds = {}
            for seed in args.seeds:
                t0 = time.perf_counter()
                name = f"t{j}_s{seed}"
                run_fit(load_recipe(ROOT / "recipes" / recipe / "world.yaml",
                                    QUIET + overrides + [f"seed={seed}", f"output_dir={tmp}", f"run_name={name}"]))
                saved = json.loads((Path(tmp) / name / "results.json").read_text())
                seeds[seed] = {"metrics": saved["task_metrics"]["test"], "seconds": round(time.perf_counter() - t0, 1)}
                print(label, seed, seeds[seed], flush=True)
            trained[label] = {"recipe": f"recipes/{recipe}/world.yaml", "overrides": overrides, "seeds": seeds}
    # a uniform guess over K classes: IoU ~ p / (p + 1/K - p/K) for a class of pixel share p;
    # with equal shares 1/K that is 1 / (2K - 1); pixel accuracy 1/K
    chance_iou, chance_acc = 100.0 / (2 * CLASSES - 1), 100.0 / CLASSES
    lines = ["world_seg_colour (12 colours, 1-3 objects per image, background ignored), shipped tiny-vit-p4 "
             "(`world`); MaskCLIP training-free, DenseCLIP trained on the 1200 training label maps; % on the test split.", "",
             "| features | mIoU | aAcc | mAcc |", "|---|---:|---:|---:|",
             f"| chance (uniform guess) | {chance_iou:.1f} | {chance_acc:.1f} | {chance_acc:.1f} |"]
    for label, r in runs.items():
        m = r["metrics"]
        lines.append(f"| {label} | {m['miou']:.2f} | {m['aacc']:.1f} | {m['macc']:.1f} |")
    for label, r in trained.items():
        cells = [mean_std([s["metrics"][k] for s in r["seeds"].values()]) for k in ("miou", "aacc", "macc")]
        lines.append(f"| {label}, seeds {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + " |")
    lines += ["", "Recipes: `recipes/maskclip/world.yaml` (`method.features=tokens` for the second row); "
              "`recipes/denseclip/world.yaml` (`method.name=denseclip_ft` for the fine-tuned row)",
              f"Command: `python experiments/{STEM}.py`"]
    result = {"runs": runs, "trained": trained, "chance": {"miou": chance_iou, "aacc": chance_acc},
              "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
