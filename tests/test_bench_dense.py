"""experiments/bench_dense.py, bench_multilabel.py and bench_text_prompts.py --quick: every
workload and target is reported (tiny model, toy sizes). No timing assertions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_dense_quick_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_dense.py"), "--quick",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_dense.json").read_text())
    assert result["quick"] is True
    assert [r["workload"] for r in result["rows"]] == ["pooled feature", "pooled + tokens", "value path",
                                                       "pooled + taps", "zero-shot", "CALIP", "MaskCLIP"]
    assert all(r["seconds_per_image"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    assert set(result["targets"]) == {"dense_vs_pooled", "calip_vs_zeroshot", "maskclip_vs_zeroshot"}
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in result["targets"].values())
    assert (tmp_path / "bench_dense.md").read_text().count("|") > 20


def test_bench_multilabel_quick_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_multilabel.py"), "--quick",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_multilabel.json").read_text())
    assert [r["workload"] for r in result["rows"]] == ["coop step", "dualcoop step", "dualcoop step, many classes"]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    assert set(result["targets"]) == {"dualcoop_vs_coop_step", "dualcoop_many_peak_gb"}
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in result["targets"].values())


def test_bench_text_prompts_quick_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_text_prompts.py"), "--quick",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_text_prompts.json").read_text())
    assert [r["workload"] for r in result["rows"]] == [
        "coop step", "coop step + a second text backward", "prograd step", "subpt step", "coop step, M=4",
        "bpl step", "coop step, images", "coop step, images with a graph", "lasp step, images"]
    assert all(math.isfinite(v) and v > 0 for v in result["floors"].values()) and len(result["floors"]) == 4
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    assert set(result["targets"]) == {"prograd_vs_coop_step", "subpt_vs_coop_step",
                                      "bpl_per_sample_vs_coop_step", "lasp_vs_coop_step"}
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in result["targets"].values())
