"""experiments/bench_weight_space.py --quick: every mode runs (tiny model, one step), the report is
complete and the run's own checks hold. No timing assertions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = {"lora", "lora_image", "dora", "lntuning", "bitfit", "must", "wiseft"}
TARGETS = {"lora_image_vs_full_ft_step", "lora_image_vs_full_ft_peak", "split_vs_fused_forward",
           "must_vs_full_ft_step"}


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_weight_space_quick_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_weight_space.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_weight_space.json").read_text())
    assert result["quick"] is True and result["config"]["model"] == "adapt-tiny-vit"
    assert {"threads", "torch", "load_average_before", "load_average_after"} <= set(result["machine"])

    steps = {r["key"]: r for r in result["steps"]}
    assert set(steps) == MODES
    for r in steps.values():
        assert all(positive(r[k]) for k in ("seconds_per_step", "peak_rss_mb", "trainable_params")), r
        assert r["losses_finite"] is True, r
    # the image tower alone trains fewer factors than both towers; DoRA adds magnitudes
    assert steps["lora_image"]["trainable_params"] < steps["lora"]["trainable_params"]
    assert steps["dora"]["trainable_params"] > steps["lora"]["trainable_params"]
    # full fine-tuning trains more than the parameter-efficient modes (MUST fine-tunes the tower too)
    assert steps["wiseft"]["trainable_params"] > max(r["trainable_params"] for k, r in steps.items()
                                                     if k not in ("wiseft", "must"))

    att = result["attention"]
    assert all(positive(att[m][k]) for m in ("fused", "split") for k in ("seconds_per_batch", "peak_rss_mb"))
    assert att["max_abs_diff_rel"] <= 1e-4 and att["equal"] is True
    assert result["checks"] == {"split_attention_equal": True, "fused_path_unsplit": True,
                                "all_blocks_split": True, "losses_finite": True}
    assert set(result["targets"]) == TARGETS
    for t in result["targets"].values():
        assert positive(t["value"]) and isinstance(t["met"], bool) and t["goal"], t
    assert positive(result["ratios"]["lora_vs_full_ft_step"]) and positive(result["ratios"]["must_vs_full_ft_step"])

    table = (tmp_path / "bench_weight_space.md").read_text()
    assert "| mode | s/step | x full FT step | peak MB | trainable params |" in table
    assert "| target | measured | goal | met |" in table
    assert all(r["mode"] in table for r in steps.values())
    assert "QUICK smoke run" in table
