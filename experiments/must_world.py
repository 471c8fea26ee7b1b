"""MUST on the world without labels: world_colour's 2,400 training images, labels dropped, the
shipped tiny CLIP (tiny-vit-p4, tag ``world``); MUST (recipes/must/world.yaml: the image tower and
a text-initialised classifier self-trained against their EMA teacher, masked image modelling)
beside zero-shot and UPL (recipes/upl/coop_world.yaml: CoOp on the 16 most confident
pseudo-labels per class), seeds 1-3; and, as a diagnostic, how the untrained model reads MUST's
weak and strong training views (world_colour's classes are colours, which RandAugment's colour
operations can change).

MUST runs the recipe's 60 epochs and UPL its 50 unless ``--epochs`` / ``--upl-epochs`` shorten
them (a shortened run is partial and never writes over the committed figures). On the 2-core
machine, otherwise idle, a MUST epoch (teacher and student passes over 2,400 images) takes about
15 s; it took 80 s while other jobs shared the cores.

    python experiments/must_world.py [--seeds 1 2 3] [--epochs N] [--upl-epochs N] [--out experiments/results]

Figures go to a new temporary folder unless ``--out`` names one. Writes must_world.json and
must_world.md.
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
from experiments.benchlib import output_dir, write_result  # noqa: E402
from experiments.clippr_world import COMMON, fit  # noqa: E402  (one run from a recipe, its figures)
from experiments.world_numbers import mean_std  # noqa: E402

STEM = "must_world"
RECIPES = {"upl": "upl/coop_world.yaml", "must": "must/world.yaml"}


def view_check(n: int = 600, seed: int = 1) -> dict:
    """How MUST's two training views read to the untrained model (its zero-shot-initialised
    classifier): accuracy against the true labels and the share above tau, on ``n`` training
    images of world_colour (labels used here only, for this diagnostic)."""
    import torch

    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.data import DataConfig
    from adapt.data.image_dataset import ImageDataset
    from adapt.data.registry import build_dataset
    from adapt.methods import build_method

    cfg = load_recipe(ROOT / "recipes" / RECIPES["must"], COMMON)
    torch.manual_seed(seed)
    bb = build_backbone(BackboneConfig(name=cfg.backbone.name, pretrained=cfg.backbone.pretrained))
    world = build_dataset(DataConfig(dataset=cfg.data.dataset))
    options = {k: v for k, v in dict(cfg.method).items() if k != "name"}
    method = build_method("must", options, bb, world.classnames, world.templates).eval()
    step = max(1, len(world.train) // n)
    items = world.train[::step][:n]
    views = ImageDataset(items, world.root, method.train_transform(bb.image_size, bb.image_mean, bb.image_std))
    pairs = torch.stack([views[i][0] for i in range(len(items))])
    labels = torch.tensor([it.label for it in items])
    out = {"images": len(items), "conf_threshold": method.config.conf_threshold}
    with torch.no_grad():
        for k, name in enumerate(("weak", "strong")):
            probs = method.student_logits(pairs[:, k]).softmax(-1)
            out[f"{name}_acc"] = 100.0 * float((probs.argmax(-1) == labels).float().mean())
            out[f"{name}_confident"] = 100.0 * float((probs.max(-1).values > method.config.conf_threshold).float().mean())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=None, help="MUST epochs (default: the recipe's 60)")
    ap.add_argument("--upl-epochs", type=int, default=None, help="UPL epochs (default: the recipe's 50)")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    args = ap.parse_args(argv)
    partial = args.seeds != [1, 2, 3] or args.epochs is not None or args.upl_epochs is not None
    out = output_dir(args.out, partial, STEM)
    start = time.perf_counter()
    epochs = {"must": args.epochs, "upl": args.upl_epochs}
    runs: dict[str, list[dict]] = {"upl": [], "must": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in runs:
                over = [f"seed={seed}", f"baseline={'true' if name == 'must' and seed == args.seeds[0] else 'false'}"]
                if epochs[name] is not None:
                    over.append(f"trainer.max_epochs={epochs[name]}")
                runs[name].append(fit(RECIPES[name], over, Path(tmp), f"{name}-{seed}"))
            print(seed, {k: v[-1]["test_acc"] for k, v in runs.items()}, flush=True)
    views = view_check()
    zeroshot = runs["must"][0]["zeroshot"]["test_acc"]
    upl = runs["upl"][0]["report"] or {}
    last = runs["must"]
    lines = [f"world_colour without labels (2,400 training images, labels dropped), shipped tiny-vit-p4 (`world`); "
             f"seeds {args.seeds}; test accuracy in % (mean ± sd over seeds)."
             + (" Partial run (fewer seeds or epochs than the recipes): not the committed figures." if partial else ""),
             "", "| method | epochs | batch | trainable params | test acc | s/run |", "|---|---:|---:|---:|---:|---:|",
             f"| zero-shot (`{'a photo of a {} shape.'}`) | | | 0 | {zeroshot:.1f} | |"]
    for row, rs in (("UPL (CoOp, 16 pseudo-labels / class)", runs["upl"]), ("MUST", runs["must"])):
        lines.append(f"| {row} | {rs[0]['epochs']} | {rs[0]['batch_size']} | {rs[0]['trainable_params']:,} | "
                     f"{mean_std([r['test_acc'] for r in rs])} | {mean_std([r['wall_seconds'] for r in rs])} |")
    lines += ["", f"UPL's pseudo-labels (seed {args.seeds[0]}): {upl.get('selected')} kept, accuracy "
              f"{upl.get('accuracy', float('nan')):.1f}%. MUST's last epoch: share of confident pseudo-labels "
              + mean_std([100 * r["scalars"]["conf_ratio"] for r in last]) + "%, losses st "
              + mean_std([r["scalars"]["st"] for r in last]) + ", fair " + mean_std([r["scalars"]["fair"] for r in last])
              + (", mim " + mean_std([r["scalars"]["mim"] for r in last]) + ", align "
                 + mean_std([r["scalars"]["align"] for r in last]) if "mim" in last[0]["scalars"] else "") + ".",
              "", f"The two training views before training ({views['images']} training images, true labels read "
              f"for this line only): weak view {views['weak_acc']:.1f}% correct, {views['weak_confident']:.1f}% above "
              f"tau {views['conf_threshold']}; strong view (RandAugment) {views['strong_acc']:.1f}% correct, "
              f"{views['strong_confident']:.1f}% above tau.",
              "", "Recipes: `recipes/must/world.yaml`, `recipes/upl/coop_world.yaml`.",
              f"Command: `python experiments/{STEM}.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                           if partial else "") + "`"]
    result = {"seeds": args.seeds, "epochs": {k: v[0]["epochs"] for k, v in runs.items()}, "partial": partial,
              "views_before_training": views,
              "zeroshot_test_acc": zeroshot, "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, STEM, json.loads(json.dumps(result)), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
