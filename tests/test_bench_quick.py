"""experiments/bench_speed.py --quick: every workload and mode runs (tiny model, toy sizes), the
report is complete, and the run's own exactness checks hold. No timing assertions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("CoOp step", "CoCoOp step", "Tip-Adapter build+search", "TPT per image", "zero-shot eval")
PROMPT_STEPS = ("VPT step", "MaPLe step", "IVLP step")


def test_bench_speed_quick_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_speed.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_speed.json").read_text())
    assert result["quick"] is True
    modes = {}
    for row in result["rows"]:
        modes.setdefault(row["workload"].split(",")[0], set()).add(row["mode"].split(" ")[0])
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0, row
    assert set(modes) == {*WORKLOADS, *PROMPT_STEPS, "image tower"}
    assert all(modes[w] == {"reference", "default"} for w in WORKLOADS), modes
    assert modes["image tower"] == {"reference", "default", "fast,"}
    assert all(modes[w] == {"eager", "default"} for w in PROMPT_STEPS), modes
    for key in ("image_tower", "vpt_step", "maple_step", "ivlp_step"):
        assert 0 < result["info"][key]["default"]["fraction"] < 2, key
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in result["targets"].values())
    assert result["info"]["coop_many_plan"]["checkpoint"]  # the automatic plan engaged
    checks = result["checks"]
    assert checks["coop_truncated_vs_full_text_max_abs"] <= 1e-5
    assert checks["cocoop_batched_vs_per_image_max_abs"] <= 1e-4
    assert checks["tip_search_same_choice"] == 1.0 and checks["eval_same_accuracy"] == 1.0
    assert checks["tpt_prediction_agrees"] == 1.0
    assert checks["image_fast_vs_open_clip_rel"] <= 1e-4
    assert checks["coop_text_grad_fast_vs_eager_rel"] <= 1e-5
    table = (tmp_path / "bench_speed.md").read_text()
    assert table.count("| reference |") == 8 and "| target | measured | goal | met |" in table


def test_benchmarks_never_write_committed_figures_by_default(tmp_path, monkeypatch):
    """bench_speed and bench_weight_space write through benchlib.output_dir."""
    sys.path.insert(0, str(ROOT))
    from experiments import bench_speed, bench_weight_space, benchlib

    assert bench_speed.output_dir is bench_weight_space.output_dir is benchlib.output_dir
    monkeypatch.setattr(benchlib.tempfile, "tempdir", str(tmp_path))
    default = benchlib.output_dir(None, False, "bench_speed")
    assert default.parent == tmp_path and default != benchlib.COMMITTED.resolve()
    assert benchlib.output_dir(str(tmp_path / "x"), True, "bench_speed") == (tmp_path / "x").resolve()
    with pytest.raises(SystemExit, match="--quick"):
        benchlib.output_dir(str(benchlib.COMMITTED), True, "bench_speed")


def test_the_class_count_extrapolation_follows_the_line_and_never_falls():
    """A quick run on a loaded machine can time 20 classes faster than 10; the extrapolated
    reference must then stay at the measured cost, not go negative (it did: -0.59 s)."""
    sys.path.insert(0, str(ROOT))
    from experiments.benchlib import linear_estimate

    assert linear_estimate([(10, 1.0), (20, 2.0)], 100) == pytest.approx(10.0)
    assert linear_estimate([(10, 1.0), (20, 0.9)], 1000) == pytest.approx(1.0)


def test_flop_counter_counts_the_cpu_attention_kernel_as_its_products():
    """The fast blocks' fused attention must count what the same products written out count,
    forward and backward, or their FLOP rates (and the CoOp images-step bound) come out low."""
    import torch
    import torch.nn.functional as F

    from experiments.benchlib import flop_counter

    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))

    def written_out():
        return (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v

    counts = []
    for attention in (lambda: F.scaled_dot_product_attention(q, k, v), written_out):
        with flop_counter() as forward:
            out = attention()
        with flop_counter() as backward:
            out.sum().backward()
        counts.append((forward.get_total_flops(), backward.get_total_flops()))
    assert counts[0][0] == counts[1][0] == 2 * 2 * 2 * 3 * 7 * 7 * 8
    assert counts[0][1] == counts[1][1] == 2 * counts[1][0]
