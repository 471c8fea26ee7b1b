"""Text-tower FLOPs (and seconds) per step before / after the shared prompt prefix.

    python experiments/text_prefix_flops.py [--out DIR] [--quick]

ViT-B/16 architecture, random weights, fp32, CPU; 100 ImageNet class names, n_ctx 16, class
token at the end. "full": every class's whole prompt through the tower (the shared path turned
off); "shared": [SOS] ctx once per step (CoOp) or per image (CoCoOp), each class its suffix.
FLOPs are counted by benchlib.flop_counter (forward + backward of the context's gradient);
seconds are the best of interleaved rounds of one CoOp step on cached features (a shared,
noisy 2-core machine: read them as a ratio). Writes text_prefix_flops.json to a temporary
folder unless --out names one.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adapt.text_prefix as text_prefix  # noqa: E402
from adapt.backbone import BackboneConfig, build_backbone  # noqa: E402
from adapt.methods import build_method  # noqa: E402
from adapt.io import atomic_write_text  # noqa: E402
from experiments.benchlib import flop_counter  # noqa: E402

REAL_OK = text_prefix.shared_prefix_ok


def set_shared(on: bool) -> None:
    text_prefix.shared_prefix_ok = REAL_OK if on else (lambda *a, **k: False)


def step_flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, 10 classes (smoke test)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    name, n_cls = ("adapt-tiny-vit", 10) if args.quick else ("ViT-B-16", 100)
    bb = build_backbone(BackboneConfig(name=name, pretrained=None))
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    names = list(IMAGENET_CLASSNAMES[:n_cls])
    coop = build_method("coop", {"n_ctx": 16}, bb, names, ["a photo of a {}."]).train()
    cocoop = build_method("cocoop", {"n_ctx": 4}, bb, names, ["a photo of a {}."]).train()
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(32, bb.embed_dim, generator=gen), dim=-1)
    y = torch.randint(0, n_cls, (32,), generator=gen)

    def coop_step():
        coop.prompts.ctx.grad = None
        F.cross_entropy(bb.logits(feats, coop.prompts.text_features()), y).backward()

    def cocoop_image():  # one image's prompts (per-image FLOPs; the batch scales them linearly)
        cocoop.zero_grad(set_to_none=True)
        f = feats[:1]
        text = cocoop.prompts.text_features_per_image(cocoop.image_context(f))
        F.cross_entropy(bb.logits(f, text), y[:1]).backward()

    result = {"model": name, "classes": n_cls, "torch": torch.__version__, "threads": 2}
    for key, fn in (("coop_step", coop_step), ("cocoop_per_image", cocoop_image)):
        row = {}
        for mode in ("full", "shared"):
            set_shared(mode == "shared")
            row[f"{mode}_gflop"] = step_flops(fn) / 1e9
        row["flop_ratio"] = row["full_gflop"] / row["shared_gflop"]
        result[key] = row
    seconds = {"full": [], "shared": []}
    for _ in range(args.rounds):
        for mode in ("full", "shared"):
            set_shared(mode == "shared")
            coop_step()  # warm-up
            t = time.perf_counter()
            coop_step()
            seconds[mode].append(time.perf_counter() - t)
    set_shared(True)
    result["coop_step_seconds"] = {m: min(v) for m, v in seconds.items()}
    result["coop_step_speedup"] = seconds["full"] and min(seconds["full"]) / min(seconds["shared"])
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="text_prefix_"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "text_prefix_flops.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written: {out / 'text_prefix_flops.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
