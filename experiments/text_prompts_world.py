"""The text-prompt family on the offline world beside zero-shot, CoOp and KgCoOp: the shipped tiny
CLIP (tiny-vit-p4, tag ``world``) on world_colour, 16 shots, few-shot (all 12 classes) and
base-to-novel (6 + 6), each recipe's own settings (epochs, batch, lr, context) with only the
backbone, dataset and shots swapped. SubPT runs both its stages per seed: its trajectory recipe
(the CoOp run it records; base-to-novel: the stage-2 recipe's 100 epochs and t_early 30), then
its subspace stage from that run. The methods built to protect novel classes should
keep novel accuracy nearer zero-shot's than CoOp does (ProGrad, LASP, SubPT, Bayesian prompts); the table says what the world shows.
ProTeCt trains on the world's colour tree (its hca / mta: experiments/hierarchy_world.py). A method
without a base-to-novel recipe (RePrompt: its kNN vote knows only the training classes) runs
few-shot only.

    python experiments/text_prompts_world.py [--seeds 1 2 3] [--methods coop kgcoop prograd lasp subpt bpl proda
                                                                        cpl protect reprompt]
                                            [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one (a partial run may not write over
the committed figures). Writes text_prompts_world.json and text_prompts_world.md.
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

STEM = "text_prompts_world"
METHODS = ["coop", "kgcoop", "prograd", "lasp", "subpt", "bpl", "proda", "cpl", "protect", "reprompt"]
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false",
         "logger.csv=false"]
SETTINGS = {"fewshot": ("all", ("test_acc",)), "base2novel": ("base2novel", ("base_acc", "novel_acc", "hm"))}


# two-stage methods: the first stage's recipe and its overrides per setting (the second stage
# starts from it: method.init_from)
FIRST_STAGE = {"subpt": ("subpt/trajectory.yaml", {
    "fewshot": [], "base2novel": ["trainer.max_epochs=100", "method.trajectory_epochs=30"]})}


# the data a method requires (ProTeCt: a class tree)
NEEDS = {"protect": [f"data.hierarchy={ROOT / 'adapt' / 'data' / 'world' / 'world_colour_tree.json'}"]}


def has_recipe(method: str, key: str) -> bool:
    return (ROOT / "recipes" / method / f"{key}.yaml").is_file()


def fit(method: str, key: str, seed: int, out: Path, baseline: bool) -> dict:
    setting = SETTINGS[key][0]
    name = f"{key}-{method}-{seed}"
    extra = list(NEEDS.get(method, []))
    if method in FIRST_STAGE:
        recipe, over = FIRST_STAGE[method]
        first = load_recipe(ROOT / "recipes" / recipe, WORLD + over[key] + [
            f"data.setting={setting}", f"seed={seed}", f"output_dir={out}", f"run_name={name}-stage1"])
        run_fit(first)
        extra += [f"method.init_from={out / (name + '-stage1')}"]
    cfg = load_recipe(ROOT / "recipes" / method / f"{key}.yaml", WORLD + extra + [
        f"data.setting={setting}", f"seed={seed}", f"output_dir={out}", f"run_name={name}",
        f"baseline={str(baseline).lower()}"])
    start = time.perf_counter()
    res = run_fit(cfg)
    return {"method": method, "seed": seed, "metrics": res["metrics"], "zeroshot": res.get("zeroshot_metrics"),
            "scalars": res.get("scalars", {}), "epochs": cfg.trainer.max_epochs, "batch_size": cfg.data.batch_size,
            "trainable_params": res["trainable_params"], "wall_seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.seeds != [1, 2, 3] or args.methods != METHODS, STEM)
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in SETTINGS:
            runs[key] = [fit(m, key, s, Path(tmp), baseline=(i == 0 and s == args.seeds[0]))
                         for i, m in enumerate(args.methods) if has_recipe(m, key) for s in args.seeds]
            for r in runs[key]:
                print(key, r["method"], r["seed"], r["metrics"], flush=True)
    lines = [f"world_colour, 16 shots, shipped tiny-vit-p4 (`world`); seeds {args.seeds}; accuracies in % "
             "(mean ± sd over seeds); each recipe's own settings.", ""]
    for key, (_, metrics) in SETTINGS.items():
        zs = next(r["zeroshot"] for r in runs[key] if r["zeroshot"])
        lines += [f"**{key}**", "", "| method | epochs | batch | trainable params | " + " | ".join(metrics)
                  + " | s/run |", "|---|---:|---:|---:|" + "---:|" * (len(metrics) + 1),
                  "| zero-shot | | | 0 | " + " | ".join(f"{zs[m]:.1f}" for m in metrics) + " | |"]
        for method in args.methods:
            rs = [r for r in runs[key] if r["method"] == method]
            if not rs:
                lines.append(f"| {method} | | | | " + " | ".join("—" for _ in metrics) + " | |")
                continue
            lines.append(f"| {method} | {rs[0]['epochs']} | {rs[0]['batch_size']} | {rs[0]['trainable_params']:,} | "
                         + " | ".join(mean_std([r["metrics"][m] for r in rs]) for m in metrics)
                         + f" | {mean_std([r['wall_seconds'] for r in rs])} |")
        conflict = [r["scalars"]["conflict_rate"] for r in runs[key] if "conflict_rate" in r["scalars"]]
        if conflict:
            lines += ["", f"ProGrad's steps whose CE gradient went against the teacher's: "
                          f"{mean_std([100 * c for c in conflict])} %."]
        lines.append("")
    lines += ["Recipes: `recipes/<method>/{fewshot,base2novel}.yaml`.", f"Command: `python experiments/{STEM}.py`"]
    result = {"seeds": args.seeds, "methods": args.methods, "runs": runs,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
