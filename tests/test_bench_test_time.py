"""experiments/bench_test_time.py --quick: every method's row at both class counts and every
target are reported (tiny model, toy sizes). No timing assertions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"zero-shot", "TPT", "TPT from CoOp", "Zero", "TDA", "DMN-ZS"}


def test_bench_test_time_quick_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_test_time.py"), "--quick",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_test_time.json").read_text())
    assert result["quick"] is True
    few, many = result["config"]["classes"], result["config"]["many"]
    by_classes = {}
    for row in result["rows"]:
        by_classes.setdefault(row["classes"], set()).add(row["method"])
        assert row["seconds_per_image"] > 0 and row["peak_rss_mb"] > 0, row
    assert by_classes[few] == METHODS | {f"encode {result['config']['views']} views"}
    assert by_classes[many] == METHODS
    assert set(result["targets"]) == {"tda_vs_zeroshot", "dmn_vs_zeroshot", "zero_vs_views", "tpt_many_peak_gb"}
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in result["targets"].values())
    assert (tmp_path / "bench_test_time.md").read_text().count("| yes |") + \
        (tmp_path / "bench_test_time.md").read_text().count("| NO |") == 4
