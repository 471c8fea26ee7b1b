"""The settings beyond few-shot on the shipped world (tiny CLIP ``tiny-vit-p4``/``world``):
cross-dataset (world_colour -> world_fill), domain generalization (world_colour -> its other
rendering domains) and UPL on world_colour beside zero-shot and supervised CoOp (16 true labels
per class, same prompt and schedule), each per seed, from the committed recipes.

    python experiments/world_settings.py [--seeds 1 2 3] [--out DIR]

Writes world_settings.json and world_settings.md to --out (default: a new temporary folder).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt.config import load_recipe  # noqa: E402
from adapt.run import run_fit  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

RECIPES = ROOT / "recipes"
QUIET = ["trainer.progress_bar=false", "logger.csv=false"]
RUNS = {
    "cross_dataset": (RECIPES / "cross_dataset/coop_world.yaml", []),
    "domain_generalization": (RECIPES / "domain_generalization/coop_world.yaml", []),
    "upl": (RECIPES / "upl/coop_world.yaml", []),
    # the supervised reference for UPL: the same recipe with 16 true labels per class
    "coop_16shot_labelled": (RECIPES / "upl/coop_world.yaml", ["data.setting=all"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="world_settings_"))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            recipe, extra = RUNS[name]
            results[name] = []
            for seed in args.seeds:
                res = run_fit(load_recipe(recipe, QUIET + extra + [f"seed={seed}", f"output_dir={tmp}/{name}"]))
                results[name].append({"seed": seed, "recipe": str(recipe.relative_to(ROOT)), "overrides": extra,
                                      "metrics": res["metrics"], "zeroshot": res.get("zeroshot_metrics"),
                                      "pseudo_labels": res.get("pseudo_labels")})
    out.mkdir(parents=True, exist_ok=True)
    (out / "world_settings.json").write_text(json.dumps(results, indent=2))
    lines = [f"Seeds {args.seeds}; mean ± std over seeds.", ""]
    for name, runs in results.items():
        lines += [f"### {name} ({runs[0]['recipe']} {' '.join(runs[0]['overrides'])})".rstrip(), "",
                  "| metric | method | zero-shot |", "|---|---|---|"]
        for key in runs[0]["metrics"]:
            zs = mean_std([r["zeroshot"][key] for r in runs]) if runs[0]["zeroshot"] else "-"
            lines.append(f"| {key} | {mean_std([r['metrics'][key] for r in runs])} | {zs} |")
        if runs[0]["pseudo_labels"]:
            pl = [r["pseudo_labels"] for r in runs]
            lines.append(f"| pseudo-label accuracy ({pl[0]['selected']} of {pl[0]['pool']} images kept) | "
                         f"{mean_std([p['accuracy'] for p in pl])} | "
                         f"{mean_std([p['zero_shot_pool_accuracy'] for p in pl])} (whole pool) |")
        lines.append("")
    (out / "world_settings.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
