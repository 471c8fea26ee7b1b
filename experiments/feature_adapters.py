"""The feature-space adapters beside zero-shot and CoOp: trainable parameters on ViT-B/16, and
accuracy on the offline world (the shipped tiny CLIP, tiny-vit-p4 tag ``world``, on
world_colour, 16 shots): few-shot test accuracy (setting all) and base-to-novel HM, each method's
own recipe (paper settings) with only the backbone and dataset swapped.

    python experiments/feature_adapters.py [--seeds 1 2 3] [--methods ...] [--out DIR]
    python experiments/feature_adapters.py --methods lora dora lntuning bitfit wiseft \
        --max-steps 200 --name weight_space --out experiments/results

Writes feature_adapters.json and feature_adapters.md (``--name``) to --out (default: a new
temporary folder). ``--max-steps N`` shortens recipes that count steps (the weight-space methods'
500 per shot) to N steps, scaling their warm-up by the same factor; it is recorded per run.
Parameters are counted on open_clip's ViT-B-16 with random weights (real shapes, no download)
for 100 classes; the linear probe's head is fitted in setup (it is still d·C + C values).
Methods that learn per-class state (linear probe, Tip-Adapter's one-hot cache) cannot classify
novel classes and have no base-to-novel entry.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapt.backbone import BackboneConfig, build_backbone  # noqa: E402
from adapt.config import load_recipe  # noqa: E402
from adapt.methods import build_method, get_method  # noqa: E402
from adapt.run import run_fit  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

METHODS = ["coop", "linearprobe", "zslp", "clipadapter", "taskres", "tipadapter"]
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.shots=16", "data.num_workers=0", "trainer.progress_bar=false",
         "logger.csv=false"]


def vit_b16_params(methods: list[str], classes: int = 100) -> dict[str, int]:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="ViT-B-16", pretrained=None))
    names = [f"class {i}" for i in range(classes)]
    return {m: sum(p.numel() for p in build_method(m, None, backbone, names, ["a photo of a {}."])
                   .trainable_parameters()) for m in methods}


def recipe_of(method: str, setting: str) -> Path:
    for name in ("fewshot" if setting == "all" else "base2novel", "fewshot"):
        path = ROOT / "recipes" / method / f"{name}.yaml"
        if path.is_file():
            return path
    raise FileNotFoundError(method)


def run(method: str, setting: str, seed: int, out: Path, baseline: bool,
        max_steps: Optional[int] = None) -> dict:
    over = WORLD + [f"data.setting={setting}", f"seed={seed}", f"output_dir={out}",
                    f"baseline={str(baseline).lower()}", f"run_name={method}_{setting}_{seed}"]
    recipe = load_recipe(recipe_of(method, setting), over)
    if max_steps and recipe.trainer.max_steps:  # a shorter run of a step-counting recipe
        warmup = round(recipe.optim.warmup_steps * max_steps / recipe.trainer.max_steps)
        recipe = load_recipe(recipe_of(method, setting), over + [
            f"trainer.max_steps={max_steps}", f"optim.warmup_steps={warmup}"])
    start = time.perf_counter()
    res = run_fit(recipe)
    return {"method": method, "setting": setting, "seed": seed, "metrics": res["metrics"],
            "zeroshot": res.get("zeroshot_metrics"), "scalars": res.get("scalars", {}),
            "inputs": res["inputs"], "epochs": recipe.trainer.max_epochs,
            "max_steps": recipe.trainer.max_steps, "trainable_params": res["trainable_params"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def table(runs: list[dict], params: dict[str, int], methods: list[str], seeds: list[int]) -> list[str]:
    def cell(method, setting, key):
        vals = [r["metrics"][key] for r in runs if (r["method"], r["setting"]) == (method, setting)]
        return mean_std(vals) if vals else "n/a"

    zs = {s: next((r["zeroshot"] for r in runs if r["setting"] == s and r["zeroshot"]), None)
          for s in ("all", "base2novel")}
    lines = [f"world_colour, 16 shots, seeds {seeds}; shipped tiny-vit-p4 (`world`); each method's "
             "own recipe. Params: trainable, on ViT-B/16 with 100 classes.", "",
             "| method | ViT-B/16 params | few-shot acc | base | novel | HM | s/run (few-shot) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if zs["all"] or zs["base2novel"]:
        a, b = zs["all"] or {}, zs["base2novel"] or {}
        fmt = lambda d, k: f"{d[k]:.1f}" if k in d else "n/a"  # noqa: E731
        lines.append(f"| zero-shot | 0 | {fmt(a, 'test_acc')} | {fmt(b, 'base_acc')} | "
                     f"{fmt(b, 'novel_acc')} | {fmt(b, 'hm')} | |")
    for m in methods:
        secs = [r["wall_seconds"] for r in runs if (r["method"], r["setting"]) == (m, "all")]
        lines.append(f"| {m} | {params[m]:,} | {cell(m, 'all', 'test_acc')} | {cell(m, 'base2novel', 'base_acc')} | "
                     f"{cell(m, 'base2novel', 'novel_acc')} | {cell(m, 'base2novel', 'hm')} | "
                     f"{mean_std(secs) if secs else ''} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="shorten step-counting recipes to this many steps (warm-up scaled)")
    parser.add_argument("--name", default="feature_adapters", help="output file stem")
    parser.add_argument("--settings", nargs="+", default=["all", "base2novel"], choices=["all", "base2novel"])
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix=f"{args.name}_"))
    params = vit_b16_params(args.methods)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for setting in args.settings:
                if setting == "base2novel" and not get_method(method).repointable:
                    continue
                for seed in args.seeds:  # zero-shot once per setting, beside the first method
                    baseline = method == args.methods[0] and seed == args.seeds[0]
                    runs.append(run(method, setting, seed, Path(tmp), baseline, args.max_steps))
                    print(json.dumps(runs[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"params_vit_b16_100_classes": params, "runs": runs,
                                                       "max_steps": args.max_steps}, indent=2))
    lines = table(runs, params, args.methods, args.seeds)
    if args.max_steps:
        lines += ["", f"Step-counting recipes shortened to {args.max_steps} steps (warm-up scaled alike)."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
