"""Prompts generated for both towers from shared modules (UPT, CAVPT) beside CoOp and MaPLe on the
offline world: the shipped tiny CLIP (tiny-vit-p4, tag ``world``) on world_colour, 16 shots,
base-to-novel (6 + 6 colours), each method's own base-to-novel recipe (epochs, batch, lr,
context, parameter groups) with only the backbone, dataset and shots swapped; seeds 1-3 with
the zero-shot baseline beside them. The table says what the world shows.

    python experiments/joint_prompts_world.py [--seeds 1 2 3] [--methods coop maple upt cavpt]
                                             [--max-epochs N] [--shots K] [--out experiments/results]

``--max-epochs`` / ``--shots`` (a reduced run: a smoke test, its numbers mean nothing) cap every
recipe's epochs and set the shots. Figures go to a new temporary folder unless ``--out`` names
one (a reduced or partial run may not write over the committed figures). Writes
joint_prompts_world.json and joint_prompts_world.md.
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

STEM = "joint_prompts_world"
METHODS = ["coop", "maple", "upt", "cavpt"]
METRICS = ("base_acc", "novel_acc", "hm")
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.num_workers=0", "data.setting=base2novel", "trainer.progress_bar=false",
         "logger.csv=false"]


def fit(method: str, seed: int, out: Path, baseline: bool, shots: int, max_epochs) -> dict:
    name = f"{method}-{seed}"
    over = WORLD + [f"data.shots={shots}", f"seed={seed}", f"output_dir={out}", f"run_name={name}",
                    f"baseline={str(baseline).lower()}"]
    cfg = load_recipe(ROOT / "recipes" / method / "base2novel.yaml", over)
    if max_epochs is not None and cfg.trainer.max_epochs > max_epochs:
        cfg = load_recipe(ROOT / "recipes" / method / "base2novel.yaml", over + [f"trainer.max_epochs={max_epochs}"])
    start = time.perf_counter()
    res = run_fit(cfg)
    return {"method": method, "seed": seed, "metrics": res["metrics"], "zeroshot": res.get("zeroshot_metrics"),
            "scalars": res.get("scalars", {}), "epochs": cfg.trainer.max_epochs, "batch_size": cfg.data.batch_size,
            "lr": cfg.optim.lr, "trainable_params": res["trainable_params"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def table(runs: list[dict], methods: list[str], seeds: list[int], shots: int) -> str:
    zs = next(r["zeroshot"] for r in runs if r["zeroshot"])
    lines = [f"world_colour base-to-novel, {shots} shots, shipped tiny-vit-p4 (`world`); seeds {seeds}; "
             "accuracies in % (mean ± sd over seeds); each recipe's own settings.", "",
             "| method | epochs | batch | lr | trainable params | " + " | ".join(METRICS) + " | s/run |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(METRICS) + 1),
             "| zero-shot | | | | 0 | " + " | ".join(f"{zs[m]:.1f}" for m in METRICS) + " | |"]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        lines.append(f"| {method} | {rs[0]['epochs']} | {rs[0]['batch_size']} | {rs[0]['lr']:g} | "
                     f"{rs[0]['trainable_params']:,} | "
                     + " | ".join(mean_std([r["metrics"][m] for r in rs]) for m in METRICS)
                     + f" | {mean_std([r['wall_seconds'] for r in rs])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--max-epochs", type=int, default=None, help="cap every recipe's epochs (a smoke test)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    reduced = args.max_epochs is not None or args.shots != 16
    out = output_dir(args.out, reduced or args.seeds != [1, 2, 3] or args.methods != METHODS, STEM)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [fit(m, s, Path(tmp), i == 0 and s == args.seeds[0], args.shots, args.max_epochs)
                for i, m in enumerate(args.methods) for s in args.seeds]
    for r in runs:
        print(r["method"], r["seed"], r["metrics"], flush=True)
    text = table(runs, args.methods, args.seeds, args.shots)
    if reduced:
        text = "**Reduced run (smoke test): these numbers mean nothing.**\n\n" + text
    cmd = "python experiments/joint_prompts_world.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text += f"\n\nRecipes: `recipes/<method>/base2novel.yaml`.\nCommand: `{cmd}`\n"
    result = {"seeds": args.seeds, "methods": args.methods, "shots": args.shots, "max_epochs": args.max_epochs,
              "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, text)


if __name__ == "__main__":
    main()
