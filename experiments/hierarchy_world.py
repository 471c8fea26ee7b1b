"""ProTeCt on the world's class tree: leaf accuracy, hierarchical consistency (hca) and mean tree-cut
accuracy (mta) of CoOp and MaPLe with and without ProTeCt's losses, beside zero-shot.

world_colour's twelve colours under the shipped tree adapt/data/world/world_colour_tree.json
(colour -> warm / cool -> reddish, pinkish, yellow / greenish, bluish -> the colours), the shipped
tiny CLIP (tiny-vit-p4, tag ``world``), 16 shots, few-shot (all 12 classes) and base-to-novel
(6 + 6: each set scored on its own part of the tree). As in ProTeCt's paper, each base method runs
under the same settings with and without the tree losses: ``coop*`` / ``maple*`` are the
``protect`` / ``protect_maple`` recipes at λ = 0 and nothing collapsed, which is CoOp's and
MaPLe's step exactly (tests/test_protect.py); ``coop`` is CoOp under its own recipe.

    python experiments/hierarchy_world.py [--seeds 1 2 3] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one. Writes hierarchy_world.json and
hierarchy_world.md.
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

STEM = "hierarchy_world"
TREE = ROOT / "adapt" / "data" / "world" / "world_colour_tree.json"
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false",
         "logger.csv=false", f"data.hierarchy={TREE}"]
NEUTRAL = ["method.lam=0", "method.collapse=0"]
# row label -> (recipe folder, extra overrides)
ROWS = {
    "coop": ("coop", []),
    "coop*": ("protect", NEUTRAL + ["method.name=protect"]),
    "protect": ("protect", []),
    "maple*": ("protect_maple", NEUTRAL),
    "protect_maple": ("protect_maple", []),
}
SETTINGS = {"fewshot": ("all", ("test",)), "base2novel": ("base2novel", ("base", "novel"))}
METRICS = ("acc", "hca", "mta")


def fit(row: str, key: str, seed: int, out: Path, baseline: bool) -> dict:
    folder, extra = ROWS[row]
    setting = SETTINGS[key][0]
    cfg = load_recipe(ROOT / "recipes" / folder / f"{key}.yaml", WORLD + extra + [
        f"data.setting={setting}", f"seed={seed}", f"output_dir={out}",
        f"run_name={key}-{row.replace('*', '-neutral')}-{seed}", f"baseline={str(baseline).lower()}"])
    start = time.perf_counter()
    res = run_fit(cfg)
    return {"row": row, "method": res["method"], "seed": seed, "task_metrics": res["task_metrics"],
            "zeroshot": res.get("zeroshot_metrics"), "scalars": res.get("scalars", {}),
            "epochs": cfg.trainer.max_epochs, "batch_size": cfg.data.batch_size,
            "trainable_params": res["trainable_params"], "wall_seconds": round(time.perf_counter() - start, 1)}


def zero_shot_rows(exp_out: Path, key: str, seed: int) -> dict:
    """Zero-shot's hca / mta: the zeroshot method's own run on the same sets (its results carry
    every metric; the baseline field of a trained run holds the primary one only)."""
    setting = SETTINGS[key][0]
    cfg = load_recipe(ROOT / "recipes" / "coop" / f"{key}.yaml", WORLD + [
        "method.name=zeroshot", f"data.setting={setting}", f"seed={seed}", f"output_dir={exp_out}",
        f"run_name={key}-zeroshot-{seed}", "baseline=false"])
    return run_fit(cfg)["task_metrics"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.seeds != [1, 2, 3], STEM)
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    zeroshot: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in SETTINGS:
            zeroshot[key] = zero_shot_rows(Path(tmp), key, args.seeds[0])
            runs[key] = [fit(row, key, s, Path(tmp), baseline=False) for row in ROWS for s in args.seeds]
            for r in runs[key]:
                print(key, r["row"], r["seed"], r["task_metrics"], flush=True)
    lines = [f"world_colour under its colour tree, 16 shots, shipped tiny-vit-p4 (`world`); seeds {args.seeds}; "
             "accuracies in % (mean ± sd over seeds). acc: leaf accuracy; hca: right at the leaf and at every "
             "node on its path; mta: mean accuracy over the tree's evaluation cuts. `*`: the ProTeCt recipe at "
             "λ = 0, nothing collapsed (the base method's step under ProTeCt's settings).", ""]
    for key, (_, sets) in SETTINGS.items():
        cols = [f"{s} {m}" for s in sets for m in METRICS]
        lines += [f"**{key}**", "", "| method | epochs | batch | trainable params | " + " | ".join(cols) + " | s/run |",
                  "|---|---:|---:|---:|" + "---:|" * (len(cols) + 1),
                  "| zero-shot | | | 0 | " + " | ".join(f"{zeroshot[key][s][m]:.1f}" for s in sets for m in METRICS)
                  + " | |"]
        for row in ROWS:
            rs = [r for r in runs[key] if r["row"] == row]
            lines.append(f"| {row} | {rs[0]['epochs']} | {rs[0]['batch_size']} | {rs[0]['trainable_params']:,} | "
                         + " | ".join(mean_std([r["task_metrics"][s][m] for r in rs]) for s in sets for m in METRICS)
                         + f" | {mean_std([r['wall_seconds'] for r in rs])} |")
        lines.append("")
    lines += ["Recipes: `recipes/{coop,protect,protect_maple}/{fewshot,base2novel}.yaml`; tree: "
              "`adapt/data/world/world_colour_tree.json`.", f"Command: `python experiments/{STEM}.py`"]
    result = {"seeds": args.seeds, "rows": {k: list(v) for k, v in ROWS.items()}, "zeroshot": zeroshot,
              "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
