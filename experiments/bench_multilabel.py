"""The cost of a DualCoOp training step against a CoOp step, and DualCoOp's memory at 1000 classes.

    python experiments/bench_multilabel.py [--quick] [--out DIR] [--threads 2]

ViT-B/16 architecture with random weights (the real model's FLOPs), fp32, CPU, one process. A
training step is forward, loss and backward on a batch of 16 images at 224 px (the frozen image
tower has no graph; the gradient reaches the contexts through the text tower): CoOp (16 context
tokens, cross-entropy) and DualCoOp (16 positive + 16 negative tokens, class-wise aggregation of
the patch tokens, asymmetric loss on multi-hot targets), both over 100 classes, timed in
alternating rounds. Then one DualCoOp step over 1000 classes (2,000 prompts through the text
tower, under the backbone's text memory plan). Peak resident memory of each (the ~0.6 GB model
included). Targets: DualCoOp step <= 1.5x a CoOp step; 1000-class DualCoOp step <= 3 GB.

Writes bench_multilabel.json and .md to --out (default: a new temporary folder). ``--quick`` runs
at toy sizes on a tiny model (a smoke test; the numbers mean nothing).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import (BenchStart, classnames, machine, bench_cli, interleaved, load_average,  # noqa: E402
                                  target_lines, targets_met, write_result)

FULL = dict(model="ViT-B-16", classes=100, many=1000, batch=16, rounds=3)
QUICK = dict(model="adapt-tiny-vit", classes=10, many=50, batch=4, rounds=1)
TEMPLATE = ["a photo of a {}."]
TARGETS = [
    ("dualcoop_vs_coop_step", "DualCoOp / CoOp training step, same batch and classes", "<= 1.5x",
     lambda v: v <= 1.5),
    ("dualcoop_many_peak_gb", "peak RSS of a 1000-class DualCoOp step", "<= 3 GB", lambda v: v <= 3.0),
]


def step(method, images, targets):
    def run():
        method.train()
        loss = method.loss(method(images), targets)
        loss.backward()
        for p in method.trainable_parameters():
            p.grad = None
        return float(loss)
    return run


def main(argv=None) -> int:
    args, cfg, out = bench_cli(__doc__, argv, "bench_multilabel", QUICK, FULL)
    from adapt.methods import build_method

    bench = BenchStart(cfg)
    start, load_before, allocator, memory = bench.start, bench.load_before, bench.allocator, bench.memory
    bb = bench.backbone
    g = bench.generator
    images = torch.randn(cfg["batch"], 3, bb.image_size, bb.image_size, generator=g)
    k = cfg["classes"]
    labels = torch.randint(0, k, (cfg["batch"],), generator=g)
    multi_hot = (torch.rand(cfg["batch"], k, generator=g) < 0.05).long()
    coop = build_method("coop", None, bb, classnames(k), TEMPLATE)
    dual = build_method("dualcoop", None, bb, classnames(k), TEMPLATE, task="multi_label")
    modes = {"coop step": (step(coop, images, labels), cfg["rounds"]),
             "dualcoop step": (step(dual, images, multi_hot), cfg["rounds"])}
    measured = interleaved(modes, memory, warmup=1)
    del coop, dual
    many = cfg["many"]
    dual_many = build_method("dualcoop", None, bb, classnames(many), TEMPLATE, task="multi_label")
    targets_many = (torch.rand(cfg["batch"], many, generator=g) < 0.005).long()
    measured["dualcoop step, many classes"] = interleaved(
        {"x": (step(dual_many, images, targets_many), 1)}, memory)["x"]
    notes = {"coop step": f"{k} classes, M=16, cross-entropy",
             "dualcoop step": f"{k} classes, M=16 + 16, asymmetric loss",
             "dualcoop step, many classes": f"{many} classes"}
    rows = [{"workload": name, "seconds": s, "seconds_per_image": s / cfg["batch"], "peak_rss_mb": peak,
             "note": notes[name]} for name, (s, peak) in measured.items()]
    per = {r["workload"]: r for r in rows}
    ratios = {"dualcoop_vs_coop_step": per["dualcoop step"]["seconds"] / per["coop step"]["seconds"],
              "dualcoop_many_peak_gb": per["dualcoop step, many classes"]["peak_rss_mb"] / 1024}
    result = {"quick": args.quick, "config": cfg, "rows": rows, "ratios": ratios,
              "targets": targets_met(TARGETS, ratios), "allocator": allocator,
              "machine": machine(args.threads, load_before),
              "wall_seconds": time.perf_counter() - start}
    lines = [f"Training steps: {cfg['model']} (random weights), fp32, CPU, {args.threads} threads, batch "
             f"{cfg['batch']}; load average before/after {load_before[:1]}/{load_average()[:1]}. "
             + ("QUICK smoke run: toy sizes, numbers mean nothing." if args.quick else ""),
             "", "| workload | s / step | peak RSS (GB) | notes |", "|---|---:|---:|---|"]
    lines += [f"| {r['workload']} | {r['seconds']:.2f} | {r['peak_rss_mb'] / 1024:.2f} | {r['note']} |" for r in rows]
    lines += target_lines(TARGETS, result["targets"],
                          value=lambda key, v: f"{v:.2f} GB" if key.endswith("_gb") else f"{v:.2f}x")
    write_result(out, "bench_multilabel", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
