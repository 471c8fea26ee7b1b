"""CLIPPR when the unlabelled pool is not balanced: a long-tailed copy of world_colour, whose
class shares are the prior CLIPPR is told, beside the uniform prior it is told when nobody knows.

The copy: every split of world_colour (train 200, val 50, test 100 images per class) thinned to
``n_c = round(n_max * ratio ** (-rank / (C - 1)))`` images of the class at ``rank`` (classes in
world_colour's order, red the head, brown the tail; ``--ratio`` 10, so 200 -> 20 training images),
the first images of each class kept; the test split is thinned the same way, so test accuracy is
accuracy on the pool's own distribution, the setting CLIPPR's prior describes. The copy is written
(images copied, a ``csv`` dataset: data.csv) into a temporary folder, read back through adapt's
``csv`` loader with world_colour's template; the true prior is the training split's shares, written
as a ``data.unlabelled.prior`` file. The shipped tiny CLIP (tiny-vit-p4, ``world``) is the
zero-shot teacher, labels are dropped (``data.setting: unsupervised``), seeds 1-3.

Rows: zero-shot; UPL (recipes/upl/coop_world.yaml: CoOp on the 16 most confident pseudo-labels
per class, which assumes a balanced pool); CLIPPR (recipes/clippr/world.yaml) at α 0 (the head
distilled from the zero-shot pseudo-labels, no prior term: what the prior is measured against),
and at α 1 (the weight of the original's custom-prior scripts, Adience / Stanford Cars, its
regression ones), 10 and 100 (its CIFAR-10 script with the uniform prior, the recipe's), each with
the uniform and with the true prior; ``clippr_ft`` at the recipe's α 100, uniform prior (its stage 2 fine-tunes the image
tower at 1e-6 for 10 epochs between the two head stages). A diagnostic: how often the zero-shot
model predicts each class on the pool, beside the class's true count (labels read for this only).
Shortened as clippr_world.py: CLIPPR 20 epochs (10 of stage 1, 10 of stage 3; recipe 70),
clippr_ft 30 (10 + 10 of stage 2 + 10), UPL 20 (recipe 50). Any other seeds, ratio or epochs make
a partial run, which never writes over the committed figures.

    python experiments/clippr_longtail.py [--seeds 1 2 3] [--ratio 10] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one. Writes clippr_longtail.json and
clippr_longtail.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt.data import DataConfig  # noqa: E402
from adapt.data.registry import build_dataset  # noqa: E402
from adapt.io import atomic_write_json  # noqa: E402
from experiments.benchlib import output_dir, write_result  # noqa: E402
from experiments.clippr_world import fit  # noqa: E402  (one run from a recipe, its figures)
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "clippr_longtail"
DEFAULTS = {"ratio": 10.0, "epochs": 20, "ft_epochs": 30, "upl_epochs": 20}
ALPHAS = (0.0, 1.0, 10.0, 100.0)


def class_counts(n_max: int, classes: int, ratio: float) -> list[int]:
    """Exponential long tail: n_max for the first class, n_max / ratio for the last."""
    return [max(1, round(n_max * ratio ** (-rank / (classes - 1)))) for rank in range(classes)]


def write_longtail(world, dest: Path, ratio: float) -> tuple[dict, dict]:
    """The long-tailed copy of world_colour under ``dest`` (images + data.csv); returns the
    per-split class counts and the training split's shares {class: share}."""
    names, rows, counts = world.classnames, [], {}
    for split in ("train", "val", "test"):
        items = getattr(world, split)
        per_class = Counter(it.label for it in items)
        keep = class_counts(max(per_class.values()), len(names), ratio)
        seen: Counter = Counter()
        for it in items:  # the first keep[c] images of class c, in the split's order
            if seen[it.label] < keep[it.label]:
                seen[it.label] += 1
                (dest / it.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(world.root) / it.path, dest / it.path)
                rows.append((it.path, names[it.label], split))
        counts[split] = {names[c]: seen[c] for c in range(len(names))}
    with open(dest / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    total = sum(counts["train"].values())
    return counts, {c: n / total for c, n in counts["train"].items()}


def zero_shot_predictions(data: Path, lt: list[str], tmp: Path, names: list[str]) -> dict[str, int]:
    """How often the zero-shot model (the recipe's template, the pseudo-labeller) predicts each
    class on the copy's training images: a ``zeroshot`` run's adapter through ``predict_files``."""
    from adapt.config import load_recipe
    from adapt.inference import load_adapter, predict_files
    from adapt.run import run_fit
    from experiments.clippr_world import COMMON

    over = lt + ["method.name=zeroshot", "method.templates=null", "data.setting=all", "data.shots=1",
                 "data.unlabelled.prior=null", "baseline=false", f"output_dir={tmp}", "run_name=zeroshot"]
    run_fit(load_recipe(ROOT / "recipes" / "clippr" / "world.yaml", COMMON + over))
    with open(data / "data.csv", newline="") as f:
        train = [row[0] for row in csv.reader(f) if row[2] == "train"]
    model = load_adapter(tmp / "zeroshot", device="cpu")
    rows = predict_files(model, [data / p for p in train], top_k=1, progress=False)
    found = Counter(r["label_1"] for r in rows)
    return {c: found.get(c, 0) for c in names}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ratio", type=float, default=DEFAULTS["ratio"], help="head / tail class size")
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="CLIPPR epochs (the recipe: 70)")
    ap.add_argument("--ft-epochs", type=int, default=DEFAULTS["ft_epochs"], help="clippr_ft epochs (10 + 10 + rest)")
    ap.add_argument("--upl-epochs", type=int, default=DEFAULTS["upl_epochs"], help="UPL epochs (the recipe: 50)")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    partial = args.seeds != [1, 2, 3] or any(getattr(args, k) != v for k, v in DEFAULTS.items())
    out = output_dir(args.out, partial, STEM)
    start = time.perf_counter()
    specs = {"upl": ("upl/coop_world.yaml", args.upl_epochs, [])}
    for alpha in ALPHAS:
        for prior_name in (("uniform",) if alpha == 0 else ("uniform", "true")):
            specs[f"clippr, α {alpha:g}" + ("" if alpha == 0 else f", {prior_name} prior")] = (
                "clippr/world.yaml", args.epochs, [f"method.alpha={alpha}", f"<{prior_name}>"])
    specs["clippr_ft, α 100, uniform prior"] = ("clippr/world.yaml", args.ft_epochs,
                                                ["method.name=clippr_ft", "<uniform>"])
    runs: dict[str, list[dict]] = {row: [] for row in specs}
    with tempfile.TemporaryDirectory() as tmp:
        data, prior = Path(tmp) / "world_colour_longtail", Path(tmp) / "prior.json"
        data.mkdir()
        world = build_dataset(DataConfig(dataset="world_colour"))
        counts, shares = write_longtail(world, data, args.ratio)
        atomic_write_json(prior, shares, indent=1)
        priors = {"<uniform>": "data.unlabelled.prior=uniform", "<true>": f"data.unlabelled.prior={prior}"}
        lt = ["data.dataset=csv", f"data.root={data}", f"data.templates={json.dumps(world.templates)}"]
        for seed in args.seeds:
            for k, (row, (recipe, epochs, extra)) in enumerate(specs.items()):
                first = seed == args.seeds[0] and k == 1  # the zero-shot baseline, once
                over = (lt + [f"seed={seed}", f"baseline={'true' if first else 'false'}",
                              f"trainer.max_epochs={epochs}"] + [priors.get(e, e) for e in extra])
                runs[row].append(fit(recipe, over, Path(tmp), f"run{k}-{seed}"))
            print(seed, {k: round(v[-1]["test_acc"], 1) for k, v in runs.items()}, flush=True)
        predicted = zero_shot_predictions(data, lt, Path(tmp), world.classnames)
    zeroshot = runs[list(runs)[1]][0]["zeroshot"]["test_acc"]
    upl = runs["upl"][0]["report"] or {}
    tr, te = counts["train"], counts["test"]
    lines = [f"world_colour thinned to a long tail (head/tail {args.ratio:g}: {max(tr.values())} -> {min(tr.values())} "
             f"training images per class, {sum(tr.values())} in all, labels dropped; test {max(te.values())} -> "
             f"{min(te.values())}, {sum(te.values())} in all, the same shares), shipped tiny-vit-p4 (`world`); seeds "
             f"{args.seeds}; test accuracy in % on the long-tailed test split (mean ± sd over seeds). CLIPPR "
             f"{args.epochs} epochs (recipe 70), clippr_ft {args.ft_epochs} (10 head, 10 image tower at 1e-6, rest "
             f"head), UPL {args.upl_epochs} (recipe 50)."
             + (" Partial run (other seeds, ratio or epochs than the stated schedule): not the committed figures."
                if partial else ""), "",
             "| method | epochs | trainable params | test acc | s/run |", "|---|---:|---:|---:|---:|",
             f"| zero-shot (`{world.templates[0]}`) | | 0 | {zeroshot:.1f} | |"]
    for row, rs in runs.items():
        lines.append(f"| {row} | {rs[0]['epochs']} | {rs[0]['trainable_params']:,} | "
                     f"{mean_std([r['test_acc'] for r in rs])} | {mean_std([r['wall_seconds'] for r in rs])} |")
    lines += ["", "True prior (training shares): " + ", ".join(f"{c} {s:.3f}" for c, s in shares.items()) + ".",
              "", "Zero-shot predictions on the pool, per class (predicted / true count): "
              + ", ".join(f"{c} {predicted[c]} / {n}" for c, n in tr.items()) + ".",
              "", f"UPL's pseudo-labels (seed {args.seeds[0]}): {upl.get('selected')} kept, accuracy "
              f"{upl.get('accuracy', float('nan')):.1f}%. CLIPPR's last epoch, agreement with the online pseudo-labels "
              "(%) and KL(π ‖ p̄): " + "; ".join(
                  f"{row}: " + mean_std([100 * r["scalars"]["agreement"] for r in rs]) + ", "
                  + f"{statistics.mean(r['scalars']['prior_kl'] for r in rs):.3f}"
                  for row, rs in runs.items() if row.startswith("clippr")) + ".", "",
              "Recipes: `recipes/clippr/world.yaml`, `recipes/upl/coop_world.yaml`, on the copy "
              "(`data.dataset=csv`, `data.root=<copy>`, `data.templates=['a photo of a {} shape.']`).",
              f"Command: `python experiments/{STEM}.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                           if partial else "") + "`"]
    result = {"seeds": args.seeds, **{k: getattr(args, k) for k in DEFAULTS}, "partial": partial,
              "counts": counts, "prior": shares, "zeroshot_pool_predictions": predicted,
              "zeroshot_test_acc": zeroshot, "runs": runs,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, json.loads(json.dumps(result)), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
