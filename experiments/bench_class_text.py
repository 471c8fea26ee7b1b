"""Building a classifier from class descriptions at ImageNet's size: 1000 classes x 50 sentences.

    python experiments/bench_class_text.py [--quick] [--out DIR] [--threads 2]

ViT-B/16 architecture with random weights (the real text tower's FLOPs), fp32, CPU, one process.
CuPL's classifier (adapt/methods/descriptions.py) over 1000 ImageNet class names with 50
sentences each (50,000 prompts of about 30 tokens, CuPL's length), built through the class-text
path: prompts in chunks of PROMPT_CHUNK, each chunk under the text tower's memory plan. Beside
it, the 1000-class classifier of one template (1000 prompts), for scale. Peak resident memory
of each build (the ~0.6 GB model included). Target: the description build <= 2.5 GB.

Writes bench_class_text.json and .md to --out (default: a new temporary folder). ``--quick``
runs at toy sizes on a tiny model (a smoke test; the numbers mean nothing).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import (BenchStart, classnames, machine, bench_cli, load_average,  # noqa: E402
                                  target_lines, targets_met, write_result)

FULL = dict(model="ViT-B-16", classes=1000, sentences=50)
QUICK = dict(model="adapt-tiny-vit", classes=20, sentences=5)
TARGETS = [("descriptions_peak_gb", "peak RSS, 1000 classes x 50 sentences", "<= 2.5 GB", lambda v: v <= 2.5)]
# sentence frames of CuPL's kind ("What does a {} look like?" answers), about 30 tokens with a name
FRAMES = (
    "A {} is usually seen in a natural setting, with a distinctive shape and colours that make it easy to spot.",
    "You can identify a {} by its overall outline, the texture of its surface and the way light falls on it.",
    "A photo of a {} often shows it from the side, against a plain background, with its details in focus.",
    "The {} has a characteristic form, and in most pictures it appears at the centre of the frame.",
    "An image from the internet of a {} typically shows the whole object, in daylight, seen from a short distance.",
)


def sentences(name: str, n: int) -> list[str]:
    return [FRAMES[i % len(FRAMES)].format(name) + f" (variant {i // len(FRAMES)})" for i in range(n)]


def main(argv=None) -> int:
    args, cfg, out = bench_cli(__doc__, argv, "bench_class_text", QUICK, FULL)
    from adapt.data.class_text import ClassText, normalised
    from adapt.methods import build_method
    from adapt.methods.class_text import PROMPT_CHUNK

    bench = BenchStart(cfg)
    start, load_before, allocator, memory = bench.start, bench.load_before, bench.allocator, bench.memory
    backbone = bench.backbone
    names = classnames(cfg["classes"])
    text = ClassText({normalised(c): tuple(sentences(c, cfg["sentences"])) for c in names})
    tokens = backbone.tokenize([s for c in names[:50] for s in text.sentences_of(c)])
    lengths = (backbone.eot_positions(tokens) + 1).float()
    rows = {}
    for key, kwargs in (("template", {}), ("descriptions", {"class_text": text})):
        memory.reset()
        t0 = time.perf_counter()
        method = build_method("zeroshot" if key == "template" else "cupl", None, backbone, names,
                              ["a photo of a {}."], **kwargs)
        seconds = time.perf_counter() - t0
        prompts = cfg["classes"] * (1 if key == "template" else cfg["sentences"])
        rows[key] = {"prompts": prompts, "seconds": round(seconds, 2), "ms_per_prompt": round(1e3 * seconds / prompts, 2),
                     "peak_gb": round(memory.peak() / 1024, 3), "classifier": list(method.text_features.shape)}
        print(key, rows[key], flush=True)
        del method
    measured = targets_met(TARGETS, {"descriptions_peak_gb": rows["descriptions"]["peak_gb"]})
    lines = [f"{cfg['model']} (random weights), fp32, {args.threads} threads, CPU; {cfg['classes']} classes; "
             f"descriptions: {cfg['sentences']} sentences per class, {lengths.mean():.0f} tokens on average "
             f"(max {lengths.max():.0f}); prompts in chunks of {PROMPT_CHUNK}; allocator: {allocator}.", "",
             "| classifier | prompts | build s | ms / prompt | peak RSS GB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['prompts']:,} | {r['seconds']:.1f} | {r['ms_per_prompt']:.2f} | {r['peak_gb']:.2f} |"
              for k, r in rows.items()]
    lines += target_lines(TARGETS, measured, value=lambda key, v: f"{v:.2f} GB")
    lines += ["", "Command: `python experiments/bench_class_text.py`"]
    result = {"config": cfg, "rows": rows, "targets": measured, "machine": machine(args.threads, load_before),
              "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(out, "bench_class_text", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
