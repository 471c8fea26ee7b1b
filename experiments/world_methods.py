"""Every method's base-to-novel recipe on the offline world: the shipped tiny CLIP (tiny-vit-p4,
tag ``world``) on world_colour, 16 shots, each recipe's own paper settings (epochs, batch size,
lr, prompt depths) with only the backbone and dataset swapped. A sanity benchmark, not a paper
reproduction: it shows each method training and transferring to novel classes on a real
(if tiny) pretrained CLIP, offline, on a CPU.

    python experiments/world_methods.py [--seeds 1 2 3] [--methods coop cocoop ...]

Writes world_methods.json and world_methods.md under experiments/results.
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
from experiments.world_numbers import mean_std  # noqa: E402

METHODS = ["coop", "cocoop", "kgcoop", "vp", "vpt", "ivlp", "maple", "promptsrc"]
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false",
         "logger.csv=false"]
METRICS = ("base_acc", "novel_acc", "hm")


def run(method: str, seed: int, out: Path, baseline: bool) -> dict:
    recipe = load_recipe(ROOT / "recipes" / method / "base2novel.yaml",
                         WORLD + [f"seed={seed}", f"output_dir={out}", f"baseline={str(baseline).lower()}"])
    start = time.perf_counter()
    res = run_fit(recipe)
    return {"method": method, "seed": seed, "metrics": res["metrics"],
            "zeroshot": res.get("zeroshot_metrics"), "epochs": recipe.trainer.max_epochs,
            "batch_size": recipe.data.batch_size, "trainable_params": res["trainable_params"],
            "inputs": res["inputs"], "wall_seconds": round(time.perf_counter() - start, 1)}


def table(runs: list[dict], methods: list[str], seeds: list[int]) -> list[str]:
    zs = next(r["zeroshot"] for r in runs if r["zeroshot"])
    lines = [f"world_colour, base-to-novel (6 + 6 classes), 16 shots, seeds {seeds}; shipped "
             "tiny-vit-p4 (`world`); each recipe's own settings.", "",
             "| method | epochs | batch | trainable params | inputs | base | novel | HM | s/run |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|",
             f"| zero-shot | | | 0 | | {zs['base_acc']:.1f} | {zs['novel_acc']:.1f} | {zs['hm']:.1f} | |"]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        cols = [mean_std([r["metrics"][k] for r in rs]) for k in METRICS]
        r0 = rs[0]
        lines.append(f"| {m} | {r0['epochs']} | {r0['batch_size']} | {r0['trainable_params']:,} | "
                     f"{r0['inputs']} | {' | '.join(cols)} | {mean_std([r['wall_seconds'] for r in rs])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(args.methods):
            for seed in args.seeds:
                runs.append(run(method, seed, Path(tmp), baseline=(i == 0 and seed == args.seeds[0])))
                print(json.dumps(runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world_methods.json").write_text(json.dumps({"runs": runs}, indent=2))
    lines = table(runs, args.methods, args.seeds)
    (args.out / "world_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
