"""The wrapper's encoders against open_clip's own, with no prompts (fp32): the largest absolute
difference of the normalized text and image features, through the plain path and through the
deep-prompt hook path with empty prompts, on two differently shaped random-weight configs and on
the shipped tiny-vit-p4 (`world`).

    python experiments/backbone_equality.py [--out experiments/results]

Writes backbone_equality.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch

from adapt.backbone import BackboneConfig, build_backbone

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a dog.", "x", "a small red striped star on a grey background, drawn", "cat"]
MODELS = [("adapt-tiny-vit", None), ("test-vit-wide", None), ("tiny-vit-p4", "world")]


def max_differences(name: str, pretrained) -> dict:
    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name=name, pretrained=pretrained))
    images = torch.randn(3, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(PROMPTS)
    empty = torch.zeros(0, bb.vision_width)
    with torch.no_grad():
        ref_text = bb.model.encode_text(tokens, normalize=True)
        ref_image = bb.model.encode_image(images, normalize=True)
        hooked = bb.encode_image(images, prompts=empty, deep_prompts=[empty] * bb.vision_depth)
        return {"model": name, "pretrained": pretrained,
                "text": float((bb.encode_text(tokens) - ref_text).abs().max()),
                "image": float((bb.encode_image(images) - ref_image).abs().max()),
                "image_hook_path": float((hooked - ref_image).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = parser.parse_args()
    open_clip.add_model_config(ROOT / "tests" / "assets" / "model_configs")  # test-vit-wide
    rows = [max_differences(name, tag) for name, tag in MODELS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbone_equality.json").write_text(json.dumps({"dtype": "float32", "rows": rows}, indent=2))
    for r in rows:
        print(f"{r['model']:>15}: text {r['text']:.2e}  image {r['image']:.2e}  "
              f"image (hook path) {r['image_hook_path']:.2e}")


if __name__ == "__main__":
    main()
