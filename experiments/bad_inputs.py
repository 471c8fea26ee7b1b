"""Every bad input of the reliability issue, tried as a user would, with the message adapt prints.

    python experiments/bad_inputs.py [--out DIR]     # default: a temporary folder

Writes ``bad_inputs.md`` (one row per input: the command, the exit code, the first line of the
message) and ``bad_inputs.json``. Each case builds its own tiny data in a temporary folder; the
backbone is the test suite's tiny random ViT, so nothing is downloaded and it runs in a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import torch  # noqa: E402

from adapt.cli import main  # noqa: E402
from tests.conftest import make_backbone, write_image_folder  # noqa: E402

RECIPES = ROOT / "recipes"
TINY = ["backbone.name=adapt-tiny-vit", "backbone.pretrained=null", "data.num_workers=0",
        "trainer.progress_bar=false", "logger.csv=false", "data.shots=2", "trainer.max_epochs=1"]


def run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    text = err.getvalue().strip().splitlines()
    lines = [ln for ln in text if ln.startswith("adapt ")]
    return code, lines[-1] if lines else (text[-1] if text else "")


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    images = write_image_folder(tmp / "images", per_split={"train": 3, "test": 2})
    out = f"output_dir={tmp / 'runs'}"
    fit = ["fit", str(RECIPES / "coop/fewshot.yaml"), *TINY, out]
    data = [f"data.root={images}"]
    # a run to land on, resume and export
    main(fit + data + ["run_name=done"])
    broken = write_image_folder(tmp / "broken", per_split={"train": 3, "test": 2})
    (broken / "train/red/0.png").write_bytes((broken / "train/red/0.png").read_bytes()[:50])
    csv_root = write_image_folder(tmp / "csv", per_split={"train": 2, "test": 1})
    (csv_root / "data.csv").write_text("path,label,split\ntrain/red/0.png,red,train\n"
                                       "train/green/0.png,green,train\ntest/red/0.png,red,test\n"
                                       "test/green/0.png,gren,test\ntest/green/0.png,green,test\n")
    missing = write_image_folder(tmp / "missing", per_split={"train": 2, "test": 1})
    (missing / "data.csv").write_text("path,label,split\ntrain/red/0.png,red,train\n"
                                      "train/red/9.png,red,train\ntest/red/0.png,red,test\n")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"\x69" * 105)
    wide = tmp / "wide.pt"
    torch.save(make_backbone("test-vit-wide").model.state_dict(), wide)
    (tmp / "list.yaml").write_text("- method: coop\n")
    (tmp / "child.yaml").write_text("_base_: missing.yaml\n")
    ad = tmp / "runs/done/adapter"
    shutil.copytree(tmp / "runs/done", tmp / "runs/trunc")
    weights = tmp / "runs/trunc/adapter/adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])
    main(["export", str(tmp / "runs/done"), str(tmp / "exported")])
    return [
        ("world task pointed at my photos (1)", ["fit", str(RECIPES / "quickstart.yaml"), f"data.root={images}", out]),
        ("rerun onto a finished run (2)", fit + data + ["run_name=done"]),
        ("resume with another lr (3)", fit + data + ["run_name=done", "resume=true", "optim.lr=0.5"]),
        ("resume with fewer epochs (3)", fit + data + ["run_name=done", "resume=true", "trainer.max_epochs=0"]),
        ("divergent lr 1e8 (4)", fit + data + ["run_name=nan", "optim.lr=1e8", "optim.warmup_epochs=0",
                                              "trainer.max_epochs=30"]),
        ("export the diverged run (17)", ["export", str(tmp / "runs/nan"), str(tmp / "x")]),
        ("truncated training image (11)", fit + [f"data.root={broken}", "run_name=b"]),
        ("CSV with a garbage label (12)", fit + ["data.dataset=csv", f"data.root={csv_root}", "run_name=c"]),
        ("CSV with missing image paths (12)", fit + ["data.dataset=csv", f"data.root={missing}",
                                                     "data.shots=0", "run_name=m"]),
        ("missing checkpoint file (15)", fit + data + [f"backbone.pretrained={tmp / 'nope.pt'}", "run_name=k"]),
        ("unknown tag (15)", ["fit", str(RECIPES / "quickstart.yaml"), "backbone.pretrained=wrold", out]),
        ("garbage .pt (15)", fit + data + [f"backbone.pretrained={garbage}", "run_name=g"]),
        ("state dict of another architecture (15)", fit + data + [f"backbone.pretrained={wide}", "run_name=w"]),
        ("missing _base_ (16)", ["fit", str(tmp / "child.yaml")]),
        ("recipe that is a list (16)", ["fit", str(tmp / "list.yaml")]),
        ("override without = (16)", ["fit", str(RECIPES / "coop/fewshot.yaml"), "data.shots"]),
        ("n_ctx with ctx_init of another length (16)",
         fit + data + ["method.n_ctx=8", "method.ctx_init=a photo of a", "run_name=n"]),
        ("adapter with a truncated tensor file (17)", ["export", str(tmp / "runs/trunc"), str(tmp / "y")]),
        ("export into a folder holding an adapter (17)", ["export", str(tmp / "runs/done"), str(tmp / "exported")]),
        ("export onto its own folder (17)", ["export", str(tmp / "runs/done"), str(ad)]),
        ("export onto a file (17)", ["export", str(tmp / "runs/done"), str(garbage)]),
        ("global batch that does not divide (10)",
         fit + data + ["run_name=ddp", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu",
                       "data.batch_size=5"]),
    ]


def main_(out: Path) -> None:
    open_clip.add_model_config(ROOT / "tests" / "assets" / "model_configs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in cases(Path(tmp)):
            code, message = run(args)
            rows.append({"input": name, "exit": code, "message": message.replace(tmp, "<tmp>")})
            print(f"{name}: exit {code}\n    {rows[-1]['message']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bad_inputs.json").write_text(json.dumps(rows, indent=2))
    table = ["| input | exit | message |", "|---|---:|---|"]
    table += [f"| {r['input']} | {r['exit']} | {r['message'].replace('|', '/')} |" for r in rows]
    (out / "bad_inputs.md").write_text("\n".join(table) + "\n")
    print(f"wrote {out / 'bad_inputs.md'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: a new temporary folder")
    a = parser.parse_args()
    main_(a.out or Path(tempfile.mkdtemp(prefix="bad_inputs_")))
