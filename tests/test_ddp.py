"""Several processes through Lightning's DDP (two CPU processes, gloo): training is sharded, the
run directory is written once, and evaluation is exact (the same accuracy as one process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _adapt(*args: str, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "adapt.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_process_ddp_fit_then_single_process_test_agree(tmp_path):
    # 7 test images per class: each half (3 classes) has an odd count, which a DistributedSampler
    # would pad with a repeated image
    root = write_image_folder(tmp_path / "images", per_split={"train": 4, "val": 2, "test": 7})
    common = ["trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}", "seed=1",
              "data.dataset=imagefolder", f"data.root={root}", "data.eval_batch_size=4"]
    out = _adapt("fit", str(ROOT / "recipes/coop/tiny.yaml"), "trainer.accelerator=cpu",
                 "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=3", *common, cwd=tmp_path)
    assert out.count("run directory:") == 1  # one report, from rank zero
    run_dir = next((tmp_path / "runs").glob("coop/*/base2novel/*"))
    assert json.loads((run_dir / "results.json").read_text())["classes"] == {"base": 3, "novel": 3}
    ddp = json.loads((run_dir / "results.json").read_text())
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert sum(1 for r in rows[1:] if r.split(",")[0] in {"0", "1", "2"}) >= 3  # every epoch trained
    # the adapter the two processes trained, evaluated by one process: the same accuracies
    _adapt("test", str(run_dir), "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
           "trainer.progress_bar=false", cwd=tmp_path)
    single = json.loads((run_dir / "test_results.json").read_text())
    assert single["metrics"] == pytest.approx(ddp["metrics"], abs=1e-6)


def test_shards_cover_a_set_once_without_padding():
    from torch.utils.data import DataLoader

    from adapt.data.sharding import shard_loader

    loader = DataLoader(list(range(21)), batch_size=4)
    shares = [[int(i) for batch in shard_loader(loader, rank, 4) for i in batch] for rank in range(4)]
    assert sorted(sum(shares, [])) == list(range(21))  # every item exactly once
    assert [len(s) for s in shares] == [6, 5, 5, 5]
    # fewer items than processes: every process reads the whole set (no empty shares)
    small = DataLoader(list(range(3)), batch_size=4)
    assert shard_loader(small, 1, 4) is small and shard_loader(loader, 0, 1) is loader
