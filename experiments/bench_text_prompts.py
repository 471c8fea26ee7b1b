"""The cost of the text-prompt family's training steps against a CoOp step (issue: part two).

    python experiments/bench_text_prompts.py [--quick] [--out DIR] [--threads 2]

ViT-B/16 architecture with random weights (the real model's FLOPs), fp32, CPU, one process,
100 classes, batch 32. A step is what the engine does: forward, loss, backward, the method's
gradient transform, an SGD step (CoOp's settings). Each method beside the CoOp step on the same
inputs, in alternating rounds:
- cached image features (the frozen image tower out of the loop, as the feature cache runs
  them): CoOp (16 random context vectors) beside ProGrad (16 vectors from "a photo of a",
  zero-padded; its teacher gradient is one more backward through the text tower) and SubPT's
  projected stage (a random orthonormal rank-10 basis standing in for a trajectory's); CoOp
  with 4 vectors from "a photo of a" beside Bayesian prompts (the same context, L = 10 shifted
  copies through the text tower: its ratio is per sample, step / (L x CoOp step));
- images at 224 px (LASP tunes the image tower's LayerNorms, so its images go through the tower
  with a graph and its backward reaches the first block): CoOp and LASP (4 context vectors, the
  text bias, 35 template features per class once, L_tt on the same step's text features).
Peak resident memory of each (the ~0.6 GB model included). Targets: ProGrad <= 1.3x CoOp,
SubPT's projected step <= 1.05x, Bayesian prompts <= 1.2x per sample, LASP <= 1.5x.

Two floors say what any faithful implementation must compute, timed in the same rounds:
- "coop step + a second text backward": CoOp's step with one more backward through the text
  tower (a KL to fixed teacher probabilities, its gradient taken apart from the CE's): what
  ProGrad needs at the least (its projection needs both gradients separately);
- "coop step, images with a graph": CoOp's step on images whose tower keeps its graph and whose
  LayerNorms learn, so the backward runs through every image block: what LASP's LayerNorm tuning
  needs at the least, before its text-to-text term.
The method's ratio to its floor is the overhead adapt could still remove.

Writes bench_text_prompts.json and .md to --out (default: a new temporary folder). ``--quick``
runs at toy sizes on a tiny model (a smoke test; the numbers mean nothing).
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

FULL = dict(model="ViT-B-16", classes=100, batch=32, rounds=6, image_rounds=2)
QUICK = dict(model="adapt-tiny-vit", classes=10, batch=4, rounds=1, image_rounds=1)
TEMPLATE = ["a photo of a {}."]
SGD = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)
TARGETS = [("prograd_vs_coop_step", "ProGrad / CoOp training step, cached features", "<= 1.3x",
            lambda v: v <= 1.3),
           ("subpt_vs_coop_step", "SubPT projected / CoOp training step, cached features", "<= 1.05x",
            lambda v: v <= 1.05),
           ("bpl_per_sample_vs_coop_step", "Bayesian prompts step / (L x CoOp step), cached features", "<= 1.2x",
            lambda v: v <= 1.2),
           ("lasp_vs_coop_step", "LASP / CoOp training step, images in the loop", "<= 1.5x", lambda v: v <= 1.5)]


def step(method, feats, labels):
    opt = torch.optim.SGD(method.trainable_parameters(), **SGD)

    def run():
        method.train()
        loss = method.loss(method.output(feats), labels)
        loss.backward()
        method.transform_gradients(lambda t: t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return run


def two_backwards(method, feats, labels, teacher):
    """The ProGrad floor: one forward, the CE gradient and a KL gradient taken separately."""
    params = method.trainable_parameters()
    opt = torch.optim.SGD(params, **SGD)

    def run():
        method.train()
        logits = method.output(feats).logits
        ce = torch.nn.functional.cross_entropy(logits, labels)
        g_ce = torch.autograd.grad(ce, params, retain_graph=True)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, reduction="batchmean")
        g_kl = torch.autograd.grad(kl, params)
        for p, a, b in zip(params, g_ce, g_kl):
            p.grad = a + 0.0 * b  # both exist; the projection itself is a few dot products
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(ce)
    return run


def through_the_tower(method, tower, images, labels):
    """The LASP floor: the image tower with its graph (its LayerNorms learn) under CoOp's step."""
    norms = [p for n, p in tower.model.visual.named_parameters() if ".ln_" in n]  # the blocks', as LASP
    for p in norms:
        p.requires_grad_(True)
    opt = torch.optim.SGD(method.trainable_parameters() + norms, **SGD)

    def run():
        method.train()
        loss = method.loss(method.output(tower.encode_image(images, normalize=False)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return run, len(norms)


def main(argv=None) -> int:
    args, cfg, out = bench_cli(__doc__, argv, "bench_text_prompts", QUICK, FULL)
    from adapt.methods import build_method

    bench = BenchStart(cfg)
    start, load_before, allocator, memory = bench.start, bench.load_before, bench.allocator, bench.memory
    bb = bench.backbone
    g = bench.generator
    k = cfg["classes"]
    feats = torch.randn(cfg["batch"], bb.embed_dim, generator=g)
    images = torch.randn(cfg["batch"], 3, bb.image_size, bb.image_size, generator=g)
    labels = torch.randint(0, k, (cfg["batch"],), generator=g)
    names = classnames(k)
    prograd = build_method("prograd", None, bb, names, TEMPLATE)
    prograd.handcrafted()  # the teacher's features: once per class list, not per step
    subpt = build_method("subpt", {"stage": "subspace"}, bb, names, TEMPLATE)
    with torch.no_grad():  # an orthonormal rank-10 basis in place of a trajectory's PCA
        subpt.basis.copy_(torch.linalg.qr(torch.randn(subpt.basis.shape[1], 10, generator=g))[0].t())
    bpl = build_method("bpl", None, bb, names, TEMPLATE)
    coop4 = build_method("coop", {"n_ctx": 4, "ctx_init": "a photo of a"}, bb, names, TEMPLATE)
    teacher = torch.softmax(torch.randn(cfg["batch"], k, generator=g), -1)
    measured = interleaved({"coop step": (step(build_method("coop", None, bb, names, TEMPLATE), feats, labels),
                                          cfg["rounds"]),
                            "coop step + a second text backward": (
                                two_backwards(build_method("coop", None, bb, names, TEMPLATE), feats, labels, teacher),
                                cfg["rounds"]),
                            "prograd step": (step(prograd, feats, labels), cfg["rounds"]),
                            "subpt step": (step(subpt, feats, labels), cfg["rounds"])}, memory, warmup=1)
    measured.update(interleaved({"coop step, M=4": (step(coop4, feats, labels), cfg["rounds"]),
                                 "bpl step": (step(bpl, feats, labels), cfg["rounds"])}, memory, warmup=1))
    lasp = build_method("lasp", None, bb, names, TEMPLATE)
    lasp.references()  # the 35 template features per class: once per class list
    floor, n_norms = through_the_tower(build_method("coop", {"n_ctx": 4, "ctx_init": "a photo of a"}, bb, names,
                                                    TEMPLATE), bb.clone(), images, labels)
    measured.update(interleaved(
        {"coop step, images": (step(build_method("coop", {"n_ctx": 4, "ctx_init": "a photo of a"}, bb, names,
                                                 TEMPLATE), images, labels), cfg["image_rounds"]),
         "coop step, images with a graph": (floor, cfg["image_rounds"]),
         "lasp step, images": (step(lasp, images, labels), cfg["image_rounds"])}, memory, warmup=1))
    notes = {"coop step": f"{k} classes, M=16, cross-entropy, cached features",
             "coop step + a second text backward": f"{k} classes, M=16, CE and KL gradients apart: ProGrad's floor",
             "coop step, images with a graph": f"{k} classes, M=4, the tower's {n_norms} LayerNorm tensors learn: "
                                               "LASP's floor",
             "prograd step": f"{k} classes, M=16, CE + teacher KL gradient, projection "
                             f"(conflicts in {prograd.conflicts} of {prograd.steps} steps)",
             "subpt step": f"{k} classes, M=16, gradient projected on a rank-10 basis",
             "coop step, M=4": f"{k} classes, M=4 from 'a photo of a', cached features",
             "bpl step": f"{k} classes, M=4, L={bpl.config.samples} shifted contexts, MC likelihood + KL",
             "coop step, images": f"{k} classes, M=4, frozen image tower without a graph",
             "lasp step, images": f"{k} classes, M=4, CE + L_tt over {len(lasp.config.templates_t2t)} templates, "
                                  f"{len(lasp.backbone_state())} LayerNorm tensors"}
    rows = [{"workload": name, "seconds": s, "seconds_per_image": s / cfg["batch"], "peak_rss_mb": peak,
             "note": notes[name]} for name, (s, peak) in measured.items()]
    per = {r["workload"]: r for r in rows}
    ratios = {"prograd_vs_coop_step": per["prograd step"]["seconds"] / per["coop step"]["seconds"],
              "subpt_vs_coop_step": per["subpt step"]["seconds"] / per["coop step"]["seconds"],
              "bpl_per_sample_vs_coop_step": per["bpl step"]["seconds"] / bpl.config.samples
              / per["coop step, M=4"]["seconds"],
              "lasp_vs_coop_step": per["lasp step, images"]["seconds"] / per["coop step, images"]["seconds"]}
    floors = {"prograd_floor_vs_coop_step": per["coop step + a second text backward"]["seconds"]
              / per["coop step"]["seconds"],
              "prograd_vs_its_floor": per["prograd step"]["seconds"] / per["coop step + a second text backward"]["seconds"],
              "lasp_floor_vs_coop_step": per["coop step, images with a graph"]["seconds"]
              / per["coop step, images"]["seconds"],
              "lasp_vs_its_floor": per["lasp step, images"]["seconds"] / per["coop step, images with a graph"]["seconds"]}
    result = {"quick": args.quick, "config": cfg, "rows": rows, "ratios": ratios, "floors": floors,
              "targets": targets_met(TARGETS, ratios), "allocator": allocator,
              "machine": machine(args.threads, load_before),
              "wall_seconds": time.perf_counter() - start}
    lines = [f"Training steps: {cfg['model']} (random weights), fp32, CPU, {args.threads} "
             f"threads, batch {cfg['batch']}; load average before/after {load_before[:1]}/{load_average()[:1]}. "
             + ("QUICK smoke run: toy sizes, numbers mean nothing." if args.quick else ""),
             "", "| workload | s / step | peak RSS (GB) | notes |", "|---|---:|---:|---|"]
    lines += [f"| {r['workload']} | {r['seconds']:.2f} | {r['peak_rss_mb'] / 1024:.2f} | {r['note']} |" for r in rows]
    lines += target_lines(TARGETS, result["targets"], value=lambda key, v: f"{v:.2f}x")
    lines += ["", f"Floors: the least ProGrad computes is {floors['prograd_floor_vs_coop_step']:.2f}x a CoOp step "
              f"(ProGrad: {floors['prograd_vs_its_floor']:.2f}x that floor); the least LASP computes is "
              f"{floors['lasp_floor_vs_coop_step']:.2f}x a CoOp step on images (LASP: "
              f"{floors['lasp_vs_its_floor']:.2f}x that floor)."]
    write_result(out, "bench_text_prompts", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
