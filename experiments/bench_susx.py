"""TIP-X (SuS-X) inference per image against Tip-Adapter's (issue 23's benchmark).

    python experiments/bench_susx.py [--quick] [--out DIR] [--threads 2]

ViT-B/16 architecture with random weights (the real model's FLOPs), fp32, CPU, one process;
ImageNet's size: 1000 classes, a support set of 16 images per class (16,000 keys), batches of 32
test images. Both methods get the same random keys and labels as their cache (``_set_cache``: what
``setup`` builds from encoded images); SuS-X's ψ map is fitted on 256 random "validation"
features. Measured in alternating rounds:
- per image, as ``adapt test`` / ``adapt predict`` run them: the frozen image tower, then the
  method's head (Tip-Adapter: zero-shot + affinity cache; TIP-X: the same plus the KL of the
  image's class signature against every support image's, rescaled by ψ);
- the heads alone, on the batch's features (what a feature-cached evaluation runs).
Target: TIP-X inference <= 1.5x Tip-Adapter's per image (with the image tower). Peak resident
memory of each.

Writes bench_susx.json and .md to --out (default: a new temporary folder). ``--quick`` runs at
toy sizes on a tiny model (a smoke test; the numbers mean nothing).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import (BenchStart, bench_cli, classnames, interleaved, load_average, machine,  # noqa: E402
                                  target_lines, targets_met, write_result)

FULL = dict(model="ViT-B-16", classes=1000, shots=16, batch=32, rounds=4, head_rounds=20)
QUICK = dict(model="adapt-tiny-vit", classes=10, shots=2, batch=4, rounds=1, head_rounds=2)
TEMPLATE = ["a photo of a {}."]
TARGETS = [("tipx_vs_tip_per_image", "TIP-X / Tip-Adapter inference per image (image tower included)",
            "<= 1.5x", lambda v: v <= 1.5)]


def main(argv=None) -> int:
    args, cfg, out = bench_cli(__doc__, argv, "bench_susx", QUICK, FULL)
    from adapt.methods import build_method

    bench = BenchStart(cfg)
    start, load_before, allocator, memory = bench.start, bench.load_before, bench.allocator, bench.memory
    bb = bench.backbone
    g = bench.generator
    k, b = cfg["classes"], cfg["batch"]
    names = classnames(k)
    keys = torch.nn.functional.normalize(torch.randn(k * cfg["shots"], bb.embed_dim, generator=g), dim=-1)
    labels = torch.arange(k).repeat_interleave(cfg["shots"])
    tip = build_method("tipadapter", {"search": False}, bb, names, TEMPLATE)
    susx = build_method("susx", {"search": False}, bb, names, TEMPLATE)
    for method in (tip, susx):
        method._set_cache(keys, labels)
        method.eval()
    susx.fit_psi(torch.nn.functional.normalize(torch.randn(256, bb.embed_dim, generator=g), dim=-1))
    images = torch.randn(b, 3, bb.image_size, bb.image_size, generator=g)
    feats = torch.nn.functional.normalize(torch.randn(b, bb.embed_dim, generator=g), dim=-1)

    def infer(method, x):
        def run():
            with torch.no_grad():
                return method(x)
        return run

    measured = interleaved({"tipadapter, images": (infer(tip, images), cfg["rounds"]),
                            "susx (TIP-X), images": (infer(susx, images), cfg["rounds"])}, memory, warmup=1)
    measured.update(interleaved({"tipadapter head, features": (infer(tip, feats), cfg["head_rounds"]),
                                 "susx (TIP-X) head, features": (infer(susx, feats), cfg["head_rounds"])},
                                memory, warmup=1))
    rows = [{"workload": name, "seconds_per_batch": s, "ms_per_image": 1000 * s / b, "peak_rss_mb": peak}
            for name, (s, peak) in measured.items()]
    per = {r["workload"]: r["seconds_per_batch"] for r in rows}
    ratios = {"tipx_vs_tip_per_image": per["susx (TIP-X), images"] / per["tipadapter, images"],
              "tipx_head_vs_tip_head": per["susx (TIP-X) head, features"] / per["tipadapter head, features"]}
    result = {"quick": args.quick, "config": cfg, "rows": rows, "ratios": ratios,
              "targets": targets_met(TARGETS, ratios), "allocator": allocator,
              "machine": machine(args.threads, load_before), "wall_seconds": time.perf_counter() - start}
    lines = [f"Inference: {cfg['model']} (random weights), fp32, CPU, {args.threads} threads, batch {b}, {k} "
             f"classes, {k * cfg['shots']:,} support keys; load average before/after {load_before[:1]}/"
             f"{load_average()[:1]}. " + ("QUICK smoke run: toy sizes, numbers mean nothing." if args.quick else ""),
             "", "| workload | ms / image | peak RSS (GB) |", "|---|---:|---:|"]
    lines += [f"| {r['workload']} | {r['ms_per_image']:.2f} | {r['peak_rss_mb'] / 1024:.2f} |" for r in rows]
    lines += target_lines(TARGETS, result["targets"], value=lambda key, v: f"{v:.2f}x")
    lines += ["", f"The heads alone (features given): TIP-X {ratios['tipx_head_vs_tip_head']:.2f}x Tip-Adapter's.",
              "", "Command: `python experiments/bench_susx.py`"]
    write_result(out, "bench_susx", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
