"""Trainable parameters of every registered method on ViT-B/16, with its default config.

    python experiments/param_counts.py [--classes 100] [--methods NAME ...] [--out experiments/results]   # default: a temp folder

The backbone is open_clip's ViT-B-16 architecture with random weights (``pretrained: null``, no
download; parameter shapes are the real model's). Each registered method is built with its
Config defaults (the papers' settings) for ``--classes`` class names; methods whose count depends
on the class list (class-specific context, caches) are marked. Methods that learn their
parameters only in ``setup`` from data (Tip-Adapter-F's cache keys) count 0 here. Prints a table
and writes ``param_counts.json``. Methods registered later are picked up automatically.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapt.io import atomic_write_json  # noqa: E402
from experiments.benchlib import output_dir  # noqa: E402
from adapt.backbone import BackboneConfig, build_backbone  # noqa: E402
from adapt.methods import build_method, get_method, list_methods  # noqa: E402

# Published or code-derived reference counts (ViT-B/16 unless noted), where one is known.
REFERENCE = {
    "coop": (8192, "16 x 512 context (KaiyangZhou/CoOp trainers/coop.py shapes, M=16)"),
    "cocoop": (35360, "4 x 512 context + meta-net 512-32-512 with biases "
                      "(KaiyangZhou/CoOp trainers/cocoop.py shapes)"),
    "kgcoop": (2048, "4 x 512 context; only parameters named 'ctx' train "
                     "(htyao89/KgCoOp trainers/kgcoop.py)"),
    "prograd": (8192, "16 x 512 context (BeierZhu/Prompt-align trainers/prograd.py, N_CTX 16)"),
    "lasp": (39424, "4 x 512 context + 512 text bias + 12 blocks x 2 LayerNorms x (768 + 768) "
                    "(1adrianb/lasp prompting/lasp.py shapes)"),
    "bpl": (3072, "4 x 512 context + 512 mean + 512 log-variance (saic-fi/Bayesian-Prompt-Learning "
                  "trainers/vpt.py, coopvpt)"),
    "proda": (262144, "32 prompts x 16 x 512 (K = 32, the reimplementations' default; no official code)"),
    "subpt": (8192, "16 x 512 context (machengcheng2016/Subspace-Prompt-Learning coop_sub.py)"),
    "vp": (69840, "30 px frame at 224 px: 2*3*30*224 + 2*3*164*30 "
                  "(hjbahng/visual_prompting models/prompters.py shapes; the paper used ViT-B/32)"),
    "maple": (3_550_000, "3.55M (MaPLe paper)"),
    "lora": (184_320, "184K (CLIP-LoRA paper, r=2 on q,k,v of both towers): 12 layers x 3 targets x "
                      "r(d_in+d_out) = 12*3*2*(768+768) + 12*3*2*(512+512)"),
}


def count(method) -> int:
    return sum(p.numel() for p in method.trainable_parameters())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--out", default=None, help="folder for param_counts.json (default: a new temporary folder)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these registered methods (default: all)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="ViT-B-16", pretrained=None))
    names = [f"class {i}" for i in range(args.classes)]
    rows = {}
    for name in args.methods or list_methods():
        start = time.perf_counter()
        tasks = get_method(name).tasks  # built for single-label data where it does it, else its own kind
        task = "single_label" if "single_label" in tasks else tasks[0]
        try:
            method = build_method(name, None, backbone, names, ["a photo of a {}."], task=task)
        except Exception as err:  # a method that cannot be built without data says so here
            rows[name] = {"trainable_params": None, "error": f"{type(err).__name__}: {err}"}
            continue
        n = count(method)
        other = count(build_method(name, None, backbone, names[: max(1, args.classes // 2)],
                                   ["a photo of a {}."], task=task))
        row = {"trainable_params": n, "depends_on_classes": n != other,
               "build_seconds": round(time.perf_counter() - start, 2)}
        if name in REFERENCE:
            row["reference_params"], row["reference_source"] = REFERENCE[name]
        rows[name] = row
        del method

    result = {"backbone": "ViT-B-16 (random weights, real shapes)", "classes": args.classes,
              "config": "each method's Config defaults", "methods": rows}
    out = output_dir(args.out, args.classes != 100 or bool(args.methods), "param_counts")
    atomic_write_json(out / "param_counts.json", result, indent=2)
    print(f"wrote {out / 'param_counts.json'}")
    print(f"{'method':<12} {'trainable':>12} {'reference':>12}  note")
    for name, row in rows.items():
        if row["trainable_params"] is None:
            print(f"{name:<12} {'-':>12} {'':>12}  {row['error']}")
            continue
        ref = row.get("reference_params")
        note = "per class list" if row["depends_on_classes"] else ""
        print(f"{name:<12} {row['trainable_params']:>12,} {'' if ref is None else f'{ref:,}':>12}  {note}")
    return result


if __name__ == "__main__":
    main()
