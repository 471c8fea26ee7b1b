"""The methods on the image's dense tokens (PLOT++, CALIP, VT-CLIP) on the offline world beside
zero-shot and CoOp: the shipped tiny CLIP (tiny-vit-p4, tag ``world``) on world_colour, 16 shots,
few-shot (all 12 classes) and base-to-novel (6 + 6), each recipe's own settings. PLOT runs as its
original does: stage 1 (``recipes/plot/vision.yaml``) on seed 1 only, then stage 2
(``fewshot.yaml`` / ``base2novel.yaml``) on every seed, started from it. CALIP (training-free)
has one recipe for both settings (``recipes/calip/fewshot.yaml``).

    python experiments/plot_world.py [--seeds 1 2 3] [--methods coop plot calip vtclip] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one (fewer than three seeds or a
subset of the methods may not write over the committed figures). Writes plot_world.json and
plot_world.md; the zero-shot row is the baseline of each setting's first run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapt.config import load_recipe  # noqa: E402
from adapt.run import run_fit  # noqa: E402
from experiments.benchlib import load_average, machine, output_dir, write_result  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "plot_world"
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false",
         "logger.csv=false"]
METHODS = ("coop", "plot", "calip", "vtclip")
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


def recipe_of(method: str, key: str) -> str:
    if method == "calip":  # training-free: one recipe, the setting from the overrides
        return "calip/fewshot.yaml"
    return f"{method}/{'fewshot' if key == 'fewshot' else 'base2novel'}.yaml"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.seeds != [1, 2, 3] or sorted(args.methods) != sorted(METHODS), STEM)
    start, load_before = time.perf_counter(), load_average()
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (setting, _) in SETTINGS.items():
            r = runs[key] = {}
            for method in args.methods:  # zero-shot once per setting, beside its first run
                if method == "plot":
                    r["plot stage 1 (seed 1)"] = [fit("plot/vision.yaml", setting, 1, Path(tmp), f"{key}-v",
                                                      baseline=not r)]
                    extra = [f"method.init_from={Path(tmp) / f'{key}-v'}"]
                else:
                    extra = []
                r[method] = [fit(recipe_of(method, key), setting, s, Path(tmp), f"{key}-{method}{s}", extra,
                                 baseline=not r and i == 0) for i, s in enumerate(args.seeds)]
            for label, rs in r.items():
                print(key, label, [x["metrics"] for x in rs], flush=True)
    lines = [f"world_colour, 16 shots, shipped tiny-vit-p4 (`world`); seeds {args.seeds} (PLOT's stage 1: "
             "seed 1, as the original); accuracies in % (mean ± sd over seeds); each recipe's own settings; "
             "s/run: wall seconds of one run on the machine named in the .json.", ""]
    for key, (_, metrics) in SETTINGS.items():
        r = runs[key]
        zs = next(x["zeroshot"] for rs in r.values() for x in rs if x["zeroshot"])
        lines += [f"**{key}**", "", "| method | epochs | trainable params | " + " | ".join(metrics) + " | s/run |",
                  "|---|---:|---:|" + "---:|" * len(metrics) + "---:|",
                  "| zero-shot | | 0 | " + " | ".join(f"{zs[m]:.1f}" for m in metrics) + " | |"]
        for label, rs in r.items():
            lines.append(f"| {label} | {rs[0]['epochs']} | {rs[0]['trainable_params']:,} | "
                         + " | ".join(mean_std([x["metrics"][m] for x in rs]) for m in metrics)
                         + f" | {mean_std([x['wall_seconds'] for x in rs])} |")
        lines.append("")
    lines += ["Recipes: `recipes/{coop,plot,vtclip}/{fewshot,base2novel}.yaml`, `recipes/plot/vision.yaml`, "
              "`recipes/calip/fewshot.yaml`",
              f"Command: `python experiments/{STEM}.py " + ("" if args.methods == list(METHODS) else
                                                           "--methods " + " ".join(args.methods) + " ")
              + f"--seeds {' '.join(map(str, args.seeds))}`"]
    result = {"seeds": args.seeds, "methods": args.methods, "machine": machine(torch.get_num_threads(), load_before), "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
