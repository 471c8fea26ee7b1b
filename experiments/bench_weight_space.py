"""Speed and memory of a training step of the weight-space methods, and of the split attention.

    python experiments/bench_weight_space.py [--quick] [--out DIR] [--threads 2]

Figures go to a fresh temporary folder unless ``--out`` names one; the committed figures change
only with an explicit ``--out experiments/results`` (from a full, not ``--quick``, run).

ViT-B/16 architecture with random weights (``pretrained: null``), fp32, CPU, batch 32, 100
classes, one run in this one process:

* Training step (forward, loss, backward, AdamW step) of LoRA (both towers: the text tower runs
  for every class in every step), LoRA on the image tower alone (``towers: [image]``), DoRA,
  LayerNorm tuning, BitFit, MUST (its EMA teacher's pass on the batch, the masked student, the
  EMA update after the step) and full fine-tuning of the image tower (``wiseft``), each method with
  its Config defaults otherwise. Each is built fresh on the one backbone (each works on its own
  clone of it) and freed before the next; seconds per step after warm-up, and the peak resident
  memory of the process during the timed steps (reset before them), with the trainable
  parameters.
* Image tower forward (no gradients) of the backbone as it is (adapt's fused fast path,
  ``fused_block``) against a clone whose blocks were rewritten with separate q/k/v projections
  (``adapt.split_attention``, what LoRA runs): seconds per batch, interleaved, and the two
  features compared.

Targets, like for like: LoRA on the image tower ≤ 0.8× the step of full fine-tuning of the image
tower (frozen weights need no weight gradients) and below its peak memory; the split attention's
forward ≤ 1.05× the fused one; a MUST step with its teacher ≤ 2.5× the full fine-tuning step. Writes bench_weight_space.json and bench_weight_space.md;
``--quick`` runs every code path on a tiny model with one step (a CI smoke test, no timing claims).
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import (classnames, PeakMemory, current_rss_mb, interleaved, load_average,  # noqa: E402
                                  matmul_gflops, output_dir, start_heap, targets_met, timed,
                                  write_result)

FULL = dict(model="ViT-B-16", classes=100, batch=32, warmup=1, steps=3, matmul_n=2048)
QUICK = dict(model="adapt-tiny-vit", classes=10, batch=4, warmup=1, steps=1, matmul_n=256)
TEMPLATE = ["a photo of a {}."]
ADAMW = dict(lr=1e-5, weight_decay=0.01)
# key -> (label, registered method, config overrides); full fine-tuning last, the ratios' base
MODES = {
    "lora": ("LoRA, both towers", "lora", None),
    "lora_image": ("LoRA, image tower", "lora", {"towers": ["image"]}),
    "dora": ("DoRA, both towers", "dora", None),
    "lntuning": ("LN tuning, both towers", "lntuning", None),
    "bitfit": ("BitFit, both towers", "bitfit", None),
    "must": ("MUST: EMA teacher + masked student, image tower", "must", None),
    "wiseft": ("full FT, image tower (wiseft)", "wiseft", None),
}
TARGETS = [  # key, label, goal, test
    ("lora_image_vs_full_ft_step", "LoRA (image tower) step / full FT (image tower) step", "<= 0.8x",
     lambda v: v <= 0.8),
    ("lora_image_vs_full_ft_peak", "LoRA (image tower) peak memory / full FT (image tower) peak", "< 1.0x",
     lambda v: v < 1.0),
    ("split_vs_fused_forward", "image tower forward: split q/k/v attention / fused", "<= 1.05x",
     lambda v: v <= 1.05),
    ("must_vs_full_ft_step", "MUST step with its teacher / full FT (image tower) step", "<= 2.5x",
     lambda v: v <= 2.5),
]


def train_step(key: str, bb, images, labels, cfg: dict, memory: PeakMemory) -> dict:
    """One mode: the method built fresh, ``warmup`` untimed and ``steps`` timed training steps."""
    from adapt.methods import build_method

    label, name, overrides = MODES[key]
    method = build_method(name, overrides, bb, classnames(cfg["classes"]), TEMPLATE).train()
    params = method.trainable_parameters()
    opt = torch.optim.AdamW(params, **ADAMW)
    losses = []

    def step():
        loss = method.loss(method.output(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_optimizer_step(len(losses))  # what the engine calls after a step (MUST's EMA)
        losses.append(float(loss.detach()))

    seconds, peak = timed(step, cfg["steps"], cfg["warmup"], memory)
    row = {"key": key, "mode": label, "method": name, "config": overrides, "seconds_per_step": seconds,
           "peak_rss_mb": peak, "trainable_params": sum(p.numel() for p in params),
           "losses_finite": all(math.isfinite(v) for v in losses)}
    print(f"  {label:32s} {seconds:8.3f} s/step  peak {peak:7.0f} MB  {row['trainable_params']:>12,} params",
          flush=True)
    return row


def attention(bb, images, cfg: dict, memory: PeakMemory) -> dict:
    """The image tower's forward, fused fast path against the split q/k/v attention."""
    from adapt.backbone import fused_block_ok
    from adapt.split_attention import split_attention

    split = bb.clone()
    n_split = split_attention(b for _, b in split.blocks("image"))

    def encode(backbone):
        def run():
            with torch.no_grad():
                return backbone.encode_image(images, normalize=False)
        return run

    got = interleaved({"fused": (encode(bb), cfg["steps"]), "split": (encode(split), cfg["steps"])},
                      memory, cfg["warmup"])
    fused, rewritten = encode(bb)(), encode(split)()
    rel = float((fused - rewritten).abs().max() / fused.abs().max())
    out = {"batch": images.shape[0], "image_size": images.shape[-1], "blocks_split": n_split,
           "fused_path_unsplit": all(fused_block_ok(b) for _, b in bb.blocks("image")),
           "fused_path_split": any(fused_block_ok(b) for _, b in split.blocks("image")),
           "max_abs_diff_rel": rel, "equal": rel <= 1e-4,
           **{mode: {"seconds_per_batch": s, "peak_rss_mb": m} for mode, (s, m) in got.items()}}
    for mode in ("fused", "split"):
        print(f"  image tower forward, {mode:6s}    {out[mode]['seconds_per_batch']:8.3f} s/batch "
              f"peak {out[mode]['peak_rss_mb']:7.0f} MB", flush=True)
    return out


def markdown(result: dict) -> str:
    m, c, att = result["machine"], result["config"], result["attention"]
    lines = [f"Benchmark: {c['model']} (random weights), fp32, CPU, {m['threads']} threads ({m['cpu']}), "
             f"torch {m['torch']}; batch {c['batch']}, {c['classes']} classes, AdamW; {c['warmup']} warm-up + "
             f"{c['steps']} timed steps per mode; matmul rate {m['matmul_gflops']:.0f} GFLOP/s; load average "
             f"before/after {m['load_average_before'][:1]}/{m['load_average_after'][:1]}. "
             f"{'QUICK smoke run: toy sizes, numbers mean nothing.' if result['quick'] else ''}", "",
             "| mode | s/step | x full FT step | peak MB | trainable params |", "|---|---:|---:|---:|---:|"]
    base = next((r for r in result["steps"] if r["key"] == "wiseft"), None)
    for r in result["steps"]:
        ratio = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}" if base else "–"
        lines.append(f"| {r['mode']} | {r['seconds_per_step']:.3f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                     f"{r['trainable_params']:,} |")
    lines += ["", f"| image tower forward, batch {att['batch']}, {att['image_size']} px, no grad | s/batch | peak MB |",
              "|---|---:|---:|",
              f"| fused (adapt's fast path) | {att['fused']['seconds_per_batch']:.3f} | "
              f"{att['fused']['peak_rss_mb']:.0f} |",
              f"| split q/k/v ({att['blocks_split']} blocks) | {att['split']['seconds_per_batch']:.3f} | "
              f"{att['split']['peak_rss_mb']:.0f} |",
              "", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for t in result["targets"].values():
        lines.append(f"| {t['label']} | {t['value']:.3f}x | {t['goal']} | {'met' if t['met'] else 'not met'} |")
    lines += ["", f"Peak memory: the process's peak resident set during the timed steps (includes the "
              f"shared frozen backbone: {m['rss_after_backbone_mb']:.0f} MB resident before the first mode; "
              f"{m['peak_memory_method']}). Split vs fused features: max abs difference "
              f"{att['max_abs_diff_rel']:.2g} of the largest feature ({'equal' if att['equal'] else 'NOT equal'})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from adapt.backbone import BackboneConfig, build_backbone

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model, one step (CI smoke test)")
    ap.add_argument("--out", default=None,
                    help="folder for bench_weight_space.json/.md (default: a new temporary folder; "
                         "the committed figures only with an explicit --out experiments/results)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)} "
                    "(a partial run: never into the committed folder)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 3)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",") if args.modes else list(MODES)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    out = output_dir(args.out, args.quick or modes != list(MODES), "bench_weight_space")
    print(f"figures will be written to {out}", flush=True)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    logging.getLogger("adapt").setLevel(logging.ERROR)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("warmup", args.warmup), ("steps", args.steps)) if v is not None})
    allocator = start_heap()
    memory = PeakMemory()
    load_before = load_average()
    start = time.perf_counter()
    matmul = matmul_gflops(cfg["matmul_n"])
    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name=cfg["model"], pretrained=None))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(cfg["batch"], 3, bb.image_size, bb.image_size, generator=gen)
    labels = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=gen)
    gc.collect()
    rss_backbone = current_rss_mb()

    att = attention(bb, images, cfg, memory)
    gc.collect()
    steps = []
    for key in modes:
        start_heap()  # each mode as its own run starts
        memory.reset()
        steps.append(train_step(key, bb, images, labels, cfg, memory))
        gc.collect()  # the method, its clone and its optimizer go before the next one is built
    by = {r["key"]: r for r in steps}
    full = by.get("wiseft")
    ratios = {f"{k}_vs_full_ft_step": r["seconds_per_step"] / full["seconds_per_step"] for k, r in by.items()
              if k != "wiseft" and full}
    if full and "lora_image" in by:
        ratios["lora_image_vs_full_ft_peak"] = by["lora_image"]["peak_rss_mb"] / full["peak_rss_mb"]
    ratios["split_vs_fused_forward"] = att["split"]["seconds_per_batch"] / att["fused"]["seconds_per_batch"]
    result = {
        "quick": args.quick, "config": {**cfg, "optimizer": {"AdamW": ADAMW}, "templates": TEMPLATE},
        "machine": {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version(), "matmul_gflops": matmul,
                    "peak_memory_method": "VmHWM (clear_refs)" if memory.exact else "sampled RSS",
                    "allocator": allocator,
                    "rss_after_backbone_mb": rss_backbone,
                    "load_average_before": load_before, "load_average_after": load_average()},
        "steps": steps, "attention": att, "ratios": ratios,
        "targets": targets_met(TARGETS, ratios),
        "checks": {"split_attention_equal": att["equal"],
                   "fused_path_unsplit": att["fused_path_unsplit"] and not att["fused_path_split"],
                   "all_blocks_split": att["blocks_split"] == len(bb.blocks("image")),
                   "losses_finite": all(r["losses_finite"] for r in steps)},
        "wall_seconds": time.perf_counter() - start,
    }
    write_result(out, "bench_weight_space", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
