"""PLOT++ on the offline world beside zero-shot and CoOp: the shipped tiny CLIP (tiny-vit-p4, tag
``world``) on world_colour, 16 shots, few-shot (all 12 classes) and base-to-novel (6 + 6), each
recipe's own settings. PLOT runs as its original does: stage 1 (``recipes/plot/vision.yaml``) on
seed 1 only, then stage 2 (``fewshot.yaml`` / ``base2novel.yaml``) on every seed, started from it.

    python experiments/plot_world.py [--seeds 1 2 3] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one (fewer than three seeds may not
write over the committed figures). Writes plot_world.json and plot_world.md.
"""
from __future__ import annotations

import argparse
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

STEM = "plot_world"
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false",
         "logger.csv=false"]
SETTINGS = {"fewshot": ("all", ("test_acc",)), "base2novel": ("base2novel", ("base_acc", "novel_acc", "hm"))}


def fit(recipe: str, setting: str, seed: int, out: Path, name: str, extra=(), baseline=False) -> dict:
    cfg = load_recipe(ROOT / "recipes" / recipe, WORLD + list(extra) + [
        f"data.setting={setting}", f"seed={seed}", f"output_dir={out}", f"run_name={name}",
        f"baseline={str(baseline).lower()}"])
    start = time.perf_counter()
    res = run_fit(cfg)
    return {"recipe": recipe, "seed": seed, "metrics": res["metrics"], "zeroshot": res.get("zeroshot_metrics"),
            "epochs": cfg.trainer.max_epochs, "trainable_params": res["trainable_params"],
            "run_dir": name, "wall_seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.seeds != [1, 2, 3], STEM)
    start = time.perf_counter()
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (setting, _) in SETTINGS.items():
            recipe = "fewshot.yaml" if key == "fewshot" else "base2novel.yaml"
            r = runs[key] = {"plot stage 1 (seed 1)": [fit("plot/vision.yaml", setting, 1, Path(tmp), f"{key}-v",
                                                           baseline=True)]}
            stage1 = str(Path(tmp) / f"{key}-v")
            r["coop"] = [fit(f"coop/{recipe}", setting, s, Path(tmp), f"{key}-coop{s}") for s in args.seeds]
            r["plot"] = [fit(f"plot/{recipe}", setting, s, Path(tmp), f"{key}-plot{s}",
                             [f"method.init_from={stage1}"]) for s in args.seeds]
            for label, rs in r.items():
                print(key, label, [x["metrics"] for x in rs], flush=True)
    lines = [f"world_colour, 16 shots, shipped tiny-vit-p4 (`world`); seeds {args.seeds} (PLOT's stage 1: "
             "seed 1, as the original); accuracies in % (mean ± sd over seeds); each recipe's own settings.", ""]
    for key, (_, metrics) in SETTINGS.items():
        r = runs[key]
        zs = r["plot stage 1 (seed 1)"][0]["zeroshot"]
        lines += [f"**{key}**", "", "| method | epochs | trainable params | " + " | ".join(metrics) + " |",
                  "|---|---:|---:|" + "---:|" * len(metrics),
                  "| zero-shot | | 0 | " + " | ".join(f"{zs[m]:.1f}" for m in metrics) + " |"]
        for label, rs in r.items():
            lines.append(f"| {label} | {rs[0]['epochs']} | {rs[0]['trainable_params']:,} | "
                         + " | ".join(mean_std([x["metrics"][m] for x in rs]) for m in metrics) + " |")
        lines.append("")
    lines += ["Recipes: `recipes/plot/{vision,fewshot,base2novel}.yaml`, `recipes/coop/{fewshot,base2novel}.yaml`",
              f"Command: `python experiments/{STEM}.py`"]
    result = {"seeds": args.seeds, "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
