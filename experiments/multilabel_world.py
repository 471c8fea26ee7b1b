"""Multi-label recognition on the offline world: the shipped tiny CLIP (tiny-vit-p4, tag ``world``)
on world_multi_colour (1-3 objects per image, the colours shown are the labels, half the training
label entries hidden), zero-shot against each multi-label method's world recipe, seeds 1-3.
TaI-DPT trains on captions only: per seed, a corpus of 20,000 captions of unrendered world scenes
(``python -m adapt.data.world.corpus``, that seed), and reads no training image.

    python experiments/multilabel_world.py [--seeds 1 2 3] [--out experiments/results]
    python experiments/multilabel_world.py --variant "lr=optim.lr=0.0005" --seeds 1

A ``--variant [METHOD:]LABEL=OVERRIDE[,OVERRIDE...]`` adds a row: that method's recipe (DualCoOp's
when no METHOD is named) with those overrides (to probe what moves the figure). Figures go to a new temporary folder unless ``--out`` names one;
a run with variants or fewer than three seeds may not write over the committed figures.
Writes multilabel_world.json and multilabel_world.md.
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
from adapt.data.world.corpus import main as write_corpus  # noqa: E402
from adapt.run import run_fit  # noqa: E402
from experiments.benchlib import output_dir, write_result  # noqa: E402
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "multilabel_world"
RECIPES = {"dualcoop": ROOT / "recipes" / "dualcoop" / "world.yaml",
           "taidpt": ROOT / "recipes" / "taidpt" / "world.yaml"}
QUIET = ["trainer.progress_bar=false", "logger.csv=false", "data.num_workers=0"]
METRICS = ("map", "cf1", "of1", "f1@3")


def fit(recipe: Path, overrides: list[str], seed: int, out: Path, baseline: bool) -> dict:
    cfg = load_recipe(recipe, QUIET + overrides + [f"seed={seed}", f"output_dir={out}",
                                                   f"baseline={str(baseline).lower()}"])
    start = time.perf_counter()
    res = run_fit(cfg)
    return {"seed": seed, "overrides": overrides, "metrics": res["task_metrics"]["test"],
            "zeroshot": res.get("zeroshot_metrics"), "epochs": cfg.trainer.max_epochs,
            "trainable_params": res["trainable_params"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def row(label: str, runs: list[dict]) -> str:
    cols = [mean_std([r["metrics"][m] for r in runs]) for m in METRICS]
    return f"| {label} | {' | '.join(cols)} |"


def zero_shot_row(runs: list[dict]) -> str:
    # the baseline pass reports its primary metric only
    return f"| zero-shot | {mean_std([r['zeroshot']['test_map'] for r in runs])} | | | |"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=OVERRIDES")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    partial = bool(args.variant) or args.seeds != [1, 2, 3]
    out = output_dir(args.out, partial, STEM)
    start = time.perf_counter()
    rows: dict[str, tuple[Path, list[str]]] = {name: (path, []) for name, path in RECIPES.items()}
    for spec in args.variant:
        label, _, overrides = spec.partition("=")
        method, _, label = label.rpartition(":")
        method = method or "dualcoop"
        rows[f"{method} ({label})"] = (RECIPES[method], [o for o in overrides.split(",") if o])
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (recipe, overrides)) in enumerate(rows.items()):
            runs[label] = []
            for seed in args.seeds:
                # the zero-shot baseline depends on the seed only through the partial-label draw
                # (which zero-shot never reads), so once per seed, with the first row
                extra = []
                if recipe == RECIPES["taidpt"]:  # its text stream: this seed's caption corpus
                    corpus = Path(tmp) / f"captions_{seed}.txt"
                    if not corpus.exists():
                        write_corpus(["world_multi_colour", str(corpus), "--seed", str(seed)])
                    extra = [f"data.captions.file={corpus}"]
                runs[label].append(fit(recipe, overrides + extra, seed, Path(tmp) / str(i), baseline=(i == 0)))
                print(label, runs[label][-1], flush=True)
    first = next(iter(runs.values()))
    lines = [f"world_multi_colour (12 colours, 1-3 objects per image, partial labels 0.5), shipped "
             f"tiny-vit-p4 (`world`), seeds {args.seeds}; metrics in % (mean ± sd over seeds).", "",
             "| method | mAP | CF1 | OF1 | F1@3 |", "|---|---:|---:|---:|---:|", zero_shot_row(first)]
    lines += [row(label, rs) for label, rs in runs.items()]
    lines += ["", "Recipes: " + ", ".join(f"`{p.relative_to(ROOT)}`" for p, _ in rows.values()),
              f"Command: `python experiments/{STEM}.py`"]
    result = {"seeds": args.seeds, "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
