"""The cost of the joint and multi-task prompt methods' training steps (issue 22's benchmark).

    python experiments/bench_multitask.py [--quick] [--out DIR] [--threads 2]

ViT-B/16 architecture with random weights (the real model's FLOPs), fp32, CPU, one process, batch
32, 100 classes. A step is what the engine does: forward, loss, backward, an SGD step. Measured in
alternating rounds:
- SoftCPT on two tasks of 50 classes each (cached image features; each image scored against its
  own task's classes, as ``data.multi_task.classifier: per_task`` does) beside two CoOp steps of
  50 classes each (16 random context vectors), the cost of training the two tasks apart.
- Images at 224 px: UPT and CAVPT beside MaPLe's step (where those methods are registered).
Targets: SoftCPT's two-task step <= 1.3x two CoOp steps; UPT and CAVPT <= 1.2x MaPLe's step.
A floor, timed in the same rounds: "maple step + a frozen image forward" is MaPLe's step plus one
pass of the unprompted tower without a graph, the zero-shot pass CAVPT's class-aware prompts read
their top-K classes from (its code runs it every step): what CAVPT needs at the least.

Writes bench_multitask.json and .md to --out (default: a new temporary folder). ``--quick`` runs at
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

FULL = dict(model="ViT-B-16", classes=100, batch=32, rounds=6, image_rounds=3)
QUICK = dict(model="adapt-tiny-vit", classes=10, batch=4, rounds=1, image_rounds=1)
TEMPLATE = ["a photo of a {}."]
SGD = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)
IMAGE_METHODS = ("upt", "cavpt")  # beside MaPLe, where registered
TARGETS = [("softcpt_vs_two_coop_steps", "SoftCPT two-task step / two CoOp steps (50 classes each)", "<= 1.3x",
            lambda v: v <= 1.3)] + [
    (f"{m}_vs_maple_step", f"{m} / MaPLe training step, images", "<= 1.2x", lambda v: v <= 1.2) for m in IMAGE_METHODS]


def step(method, inputs, labels, task_ids=None):
    from adapt.tasks.single_label import own_task_logits

    opt = torch.optim.SGD(method.trainable_parameters(), **SGD)

    def run():
        method.train()
        out = method.output(inputs)
        if task_ids is not None:  # the engine's per_task classifier
            out.logits = own_task_logits(out.logits, labels, task_ids)
        loss = method.loss(out, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return run


def main(argv=None) -> int:
    args, cfg, out = bench_cli(__doc__, argv, "bench_multitask", QUICK, FULL)
    from adapt.methods import build_method, list_methods
    from adapt.tasks.single_label import task_ids

    bench = BenchStart(cfg)
    start, load_before, allocator, memory = bench.start, bench.load_before, bench.allocator, bench.memory
    bb = bench.backbone
    g = bench.generator
    k, b = cfg["classes"], cfg["batch"]
    half = k // 2
    names = classnames(k)
    tasks = ["first task"] * half + ["second task"] * (k - half)
    feats = torch.randn(b, bb.embed_dim, generator=g)
    labels = torch.randint(0, k, (b,), generator=g)
    # two CoOp runs: each sees its own task's images (the same batch size) and classes
    coop_a = build_method("coop", None, bb, names[:half], TEMPLATE)
    coop_b = build_method("coop", None, bb, names[half:], TEMPLATE)
    labels_a, labels_b = labels % half, labels % (k - half)
    step_a, step_b = step(coop_a, feats, labels_a), step(coop_b, feats, labels_b)
    softcpt = build_method("softcpt", None, bb, names, TEMPLATE, class_tasks=tasks)
    measured = interleaved({"two coop steps": (lambda: (step_a(), step_b()), cfg["rounds"]),
                            "softcpt step": (step(softcpt, feats, labels, task_ids(tasks)), cfg["rounds"])},
                           memory, warmup=1)
    images = torch.randn(b, 3, bb.image_size, bb.image_size, generator=g)
    maple_step = step(build_method("maple", None, bb, names, TEMPLATE), images, labels)

    def maple_and_a_frozen_forward():
        maple_step()
        with torch.no_grad():
            bb.encode_image(images)

    image_modes = {"maple step, images": (maple_step, cfg["image_rounds"])}
    present = [m for m in IMAGE_METHODS if m in list_methods()]
    for m in present:
        image_modes[f"{m} step, images"] = (step(build_method(m, None, bb, names, TEMPLATE), images, labels),
                                           cfg["image_rounds"])
    if "cavpt" in present:
        image_modes["maple step + a frozen image forward"] = (maple_and_a_frozen_forward, cfg["image_rounds"])
    measured.update(interleaved(image_modes, memory, warmup=1))
    rows = [{"workload": name, "seconds": s, "peak_rss_mb": peak} for name, (s, peak) in measured.items()]
    per = {r["workload"]: r["seconds"] for r in rows}
    ratios = {"softcpt_vs_two_coop_steps": per["softcpt step"] / per["two coop steps"],
              **{f"{m}_vs_maple_step": per[f"{m} step, images"] / per["maple step, images"] for m in present}}
    floors = ({"cavpt_floor_vs_maple_step": per["maple step + a frozen image forward"] / per["maple step, images"],
               "cavpt_vs_its_floor": per["cavpt step, images"] / per["maple step + a frozen image forward"]}
              if "cavpt" in present else {})
    targets = [t for t in TARGETS if t[0] in ratios]
    result = {"quick": args.quick, "config": cfg, "rows": rows, "ratios": ratios, "floors": floors,
              "targets": targets_met(targets, ratios), "not_registered": [m for m in IMAGE_METHODS if m not in present],
              "allocator": allocator, "machine": machine(args.threads, load_before),
              "wall_seconds": time.perf_counter() - start}
    lines = [f"Training steps: {cfg['model']} (random weights), fp32, CPU, {args.threads} threads, batch {b}, "
             f"{k} classes; load average before/after {load_before[:1]}/{load_average()[:1]}. "
             + ("QUICK smoke run: toy sizes, numbers mean nothing." if args.quick else ""),
             "", "| workload | s / step | peak RSS (GB) |", "|---|---:|---:|"]
    lines += [f"| {r['workload']} | {r['seconds']:.2f} | {r['peak_rss_mb'] / 1024:.2f} |" for r in rows]
    lines += target_lines(targets, result["targets"], value=lambda key, v: f"{v:.2f}x")
    if floors:
        lines += ["", f"Floor: the least CAVPT computes is {floors['cavpt_floor_vs_maple_step']:.2f}x MaPLe's step "
                  f"(CAVPT: {floors['cavpt_vs_its_floor']:.2f}x that floor)."]
    write_result(out, "bench_multitask", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
