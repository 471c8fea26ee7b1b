"""The allocator's heap policy (adapt/process.py): time, kernel time and peak memory of three
workloads under three policies, each workload in a fresh process per policy.

    python experiments/heap_policy.py [--quick] [--out DIR] [--threads 2]

Policies:
* ``bounded``: glibc's mmap threshold fixed at 1 MiB for the whole process (adapt's CPU default
  before this measurement);
* ``reuse``: fixed at 32 MiB for the whole process, never switched;
* ``adapt``: what a run gets now: ``bounded`` until the first pass that builds a graph, then
  ``bounded`` for good if it was checkpointed, else ``reuse`` (until a pass checkpoints).

Workloads (ViT-B/16 architecture, random weights, fp32): the CoOp text pass at 100 classes
(forward + input-gradient backward of the class prompts), the 1000-class CoOp step on cached
features (the automatic memory plan checkpoints and chunks it), and the image tower on a batch
of 32 without gradients. Writes heap_policy.json / .md; ``--quick`` runs it all on the tiny model
(a smoke test; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import load_average, output_dir, write_result  # noqa: E402

POLICIES = {"bounded": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
            "reuse": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)},
            "adapt": {}}
WORKLOADS = ("coop_text_100", "coop_step_many", "image_tower")
FULL = dict(model="ViT-B-16", classes=100, many=1000, batch=32, repeats=3, text_memory_mb=None)
QUICK = dict(model="adapt-tiny-vit", classes=10, many=40, batch=4, repeats=1, text_memory_mb=4.0)


def measure(workload: str, cfg: dict, threads: int) -> dict:
    """One workload in this (fresh) process: best-of-repeats seconds, the kernel (system) CPU
    seconds of that call, peak RSS, and the heap policy the process ended under."""
    import torch
    import torch.nn.functional as F

    from adapt import process
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.methods import build_method
    from experiments.bench_speed import SGD, TEMPLATE
    from experiments.benchlib import PeakMemory, classnames, matmul_gflops

    torch.set_num_threads(threads)
    process.prepare_cpu_process("cpu")  # the policy a run starts with (or the env's threshold)
    memory = PeakMemory()
    kw = {} if cfg["text_memory_mb"] is None else {"text_memory_mb": cfg["text_memory_mb"]}
    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name=cfg["model"], pretrained=None, **kw))
    gen = torch.Generator().manual_seed(0)
    if workload == "coop_text_100":
        method = build_method("coop", {"n_ctx": 16}, bb, classnames(cfg["classes"]), TEMPLATE).train()
        grad = torch.randn(cfg["classes"], bb.embed_dim, generator=gen)

        def fn():
            method.prompts.text_features().backward(grad)
        repeats = cfg["repeats"]
    elif workload == "coop_step_many":
        method = build_method("coop", {"n_ctx": 16}, bb, classnames(cfg["many"]), TEMPLATE).train()
        opt = torch.optim.SGD(method.trainable_parameters(), **SGD)
        feats = F.normalize(torch.randn(cfg["batch"], bb.embed_dim, generator=gen), dim=-1)
        y = torch.randint(0, cfg["many"], (cfg["batch"],), generator=gen)

        def fn():
            loss = F.cross_entropy(method.forward_features(feats), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        repeats = 1
    else:
        images = torch.randn(cfg["batch"], 3, bb.image_size, bb.image_size, generator=gen)

        def fn():
            with torch.no_grad():
                bb.encode_image(images)
        repeats = max(1, cfg["repeats"] - 1)
    fn()  # warm-up: kernels chosen, and the policy a first pass leads to
    best = (float("inf"), 0.0)
    memory.reset()
    for _ in range(repeats):
        t0, cpu0 = time.perf_counter(), os.times()
        fn()
        seconds, cpu1 = time.perf_counter() - t0, os.times()
        best = min(best, (seconds, cpu1.system - cpu0.system))
    return {"seconds": best[0], "system_cpu_s": best[1], "peak_rss_mb": memory.peak(),
            "policy_at_end": process.heap_policy() or f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}",
            "matmul_gflops": matmul_gflops(2048 if cfg["model"] != QUICK["model"] else 256, 3)}


def child(argv: list[str]) -> int:
    workload, quick, threads = argv[0], argv[1] == "1", int(argv[2])
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    print(json.dumps(measure(workload, QUICK if quick else FULL, threads)))
    return 0


def markdown(result: dict) -> str:
    lines = [f"Heap policies ({result['config']['model']}, random weights, fp32, {result['threads']} threads, "
             f"a fresh process per cell; load average before/after {result['load_average_before'][:1]}/"
             f"{result['load_average_after'][:1]}). {'QUICK smoke run: numbers mean nothing.' if result['quick'] else ''}",
             "", "| workload | policy | seconds | kernel CPU s | peak RSS (GB) | policy at the end | matmul GFLOP/s |",
             "|---|---|---:|---:|---:|---|---:|"]
    for w in WORKLOADS:
        for p in POLICIES:
            c = result["cells"][w][p]
            lines.append(f"| {w} | {p} | {c['seconds']:.2f} | {c['system_cpu_s']:.2f} | {c['peak_rss_mb'] / 1024:.2f} | "
                         f"{c['policy_at_end']} | {c['matmul_gflops']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default: a new temporary folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = output_dir(args.out, args.quick, "heap_policy")
    print(f"figures will be written to {out}", flush=True)
    start, load_before = time.perf_counter(), load_average()
    cells: dict = {w: {} for w in WORKLOADS}
    for w in WORKLOADS:
        for p, env in POLICIES.items():
            child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            proc = subprocess.run([sys.executable, __file__, "--child", w, str(int(args.quick)), str(args.threads)],
                                  capture_output=True, text=True, env={**child_env, **env}, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{w} under {p} failed:\n{proc.stderr[-3000:]}")
            cells[w][p] = json.loads(proc.stdout.strip().splitlines()[-1])
            c = cells[w][p]
            print(f"  {w:16s} {p:8s} {c['seconds']:8.2f} s  kernel {c['system_cpu_s']:6.2f} s  "
                  f"peak {c['peak_rss_mb']:7.0f} MB  ends {c['policy_at_end']}", flush=True)
    result = {"quick": args.quick, "config": QUICK if args.quick else FULL, "threads": args.threads,
              "cells": cells, "load_average_before": load_before, "load_average_after": load_average(),
              "wall_seconds": time.perf_counter() - start}
    write_result(out, "heap_policy", result, markdown(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
