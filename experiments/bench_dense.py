"""Per-image cost of the dense outputs and of the methods that read them, against pooled features.

    python experiments/bench_dense.py [--quick] [--out DIR] [--threads 2]

ViT-B/16 architecture with random weights (the real model's FLOPs), fp32, CPU, one process, a
batch of 16 images at 224 px, 100 classes (text features cached, as at evaluation). Timed in
alternating rounds, so that a load change on a shared machine hits every row alike: the pooled
feature (``encode_image``), the dense call for pooled + patch tokens, the value path alone
(MaskCLIP's features: the last block's attention skipped), the dense call with four block taps
(DenseCLIP's 3, 5, 7, 11), zero-shot, CALIP and MaskCLIP predictions on images (MaskCLIP: 85
templates ensembled into the cached class features, a [K, 14, 14] map per image). Peak resident
memory of each. Targets: dense features <= 1.15x pooled per image; CALIP and MaskCLIP inference
<= 1.3x zero-shot.

Writes bench_dense.json and .md to --out (default: a new temporary folder). ``--quick`` runs every
row at toy sizes on a tiny model (a smoke test; the numbers mean nothing).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import (classnames, machine, PeakMemory, bench_cli, interleaved, load_average,  # noqa: E402
                                  start_heap, target_lines, targets_met, write_result)

FULL = dict(model="ViT-B-16", classes=100, batch=16, rounds=4, taps=[3, 5, 7, 11])
QUICK = dict(model="adapt-tiny-vit", classes=10, batch=4, rounds=1, taps=[0, 1])
TEMPLATE = ["a photo of a {}."]
TARGETS = [
    ("dense_vs_pooled", "pooled + patch tokens / pooled feature, per image", "<= 1.15x", lambda v: v <= 1.15),
    ("calip_vs_zeroshot", "CALIP / zero-shot inference, per image", "<= 1.3x", lambda v: v <= 1.3),
    ("maskclip_vs_zeroshot", "MaskCLIP / zero-shot inference, per image", "<= 1.3x", lambda v: v <= 1.3),
]


def modes(cfg: dict) -> tuple[dict, dict]:
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.methods import build_method

    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name=cfg["model"], pretrained=None))
    images = torch.randn(cfg["batch"], 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    names = classnames(cfg["classes"])
    zs = build_method("zeroshot", None, bb, names, TEMPLATE).eval()
    calip = build_method("calip", None, bb, names, TEMPLATE).eval()
    maskclip = build_method("maskclip", None, bb, names, TEMPLATE, task="segmentation").eval()

    def no_grad(fn):
        return lambda: torch.no_grad()(fn)()

    rows = {
        "pooled feature": (no_grad(lambda: bb.encode_image(images)), "encode_image"),
        "pooled + tokens": (no_grad(lambda: bb.encode_image_dense(images, outputs=("pooled", "tokens"))),
                            "encode_image_dense"),
        "value path": (no_grad(lambda: bb.encode_image_dense(images, outputs=("value",))),
                       "MaskCLIP's features; the last block's attention skipped"),
        "pooled + taps": (no_grad(lambda: bb.encode_image_dense(images, outputs=("pooled",), taps=cfg["taps"])),
                            f"DenseCLIP's token maps after blocks {cfg['taps']}"),
        "zero-shot": (no_grad(lambda: zs.predict(images)), f"{cfg['classes']} classes, text cached"),
        "CALIP": (no_grad(lambda: calip.predict(images)), f"{cfg['classes']} classes, text cached"),
        "MaskCLIP": (no_grad(lambda: maskclip.predict(images)), f"{cfg['classes']} classes, a map per image"),
    }
    return {k: (fn, cfg["rounds"]) for k, (fn, _) in rows.items()}, {k: note for k, (_, note) in rows.items()}


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"Dense outputs: {c['model']} (random weights), fp32, CPU, {m['threads']} threads, batch {c['batch']}; "
             f"load average before/after {m['load_average_before'][:1]}/{m['load_average_after'][:1]} "
             "(a shared machine). " + ("QUICK smoke run: toy sizes, numbers mean nothing." if result["quick"] else ""),
             "", "| workload | s / image | × pooled | peak RSS (GB) | notes |", "|---|---:|---:|---:|---|"]
    pooled = result["rows"][0]["seconds_per_image"]
    for r in result["rows"]:
        lines.append(f"| {r['workload']} | {r['seconds_per_image']:.4f} | {r['seconds_per_image'] / pooled:.2f} | "
                     f"{r['peak_rss_mb'] / 1024:.2f} | {r['note']} |")
    lines += target_lines(TARGETS, result["targets"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, cfg, out = bench_cli(__doc__, argv, "bench_dense", QUICK, FULL)
    start, load_before = time.perf_counter(), load_average()
    allocator = start_heap()
    memory = PeakMemory()
    timed_modes, notes = modes(cfg)
    measured = interleaved(timed_modes, memory, warmup=1)
    rows = [{"workload": k, "seconds_per_image": s / cfg["batch"], "peak_rss_mb": peak, "note": notes[k]}
            for k, (s, peak) in measured.items()]
    per = {r["workload"]: r["seconds_per_image"] for r in rows}
    ratios = {"dense_vs_pooled": per["pooled + tokens"] / per["pooled feature"],
              "calip_vs_zeroshot": per["CALIP"] / per["zero-shot"],
              "maskclip_vs_zeroshot": per["MaskCLIP"] / per["zero-shot"],
              "value_vs_pooled": per["value path"] / per["pooled feature"],
              "taps_vs_pooled": per["pooled + taps"] / per["pooled feature"]}
    result = {"quick": args.quick, "config": cfg, "rows": rows, "ratios": ratios,
              "targets": targets_met(TARGETS, ratios), "allocator": allocator,
              "machine": machine(args.threads, load_before),
              "wall_seconds": time.perf_counter() - start}
    write_result(out, "bench_dense", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
