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


def test_two_processes_learn_what_one_process_learns_at_the_same_global_batch(tmp_path):
    """data.batch_size is the global batch: each process reads its half of every batch of one
    epoch order, and DDP averages the two half-batch gradients, which is the full-batch gradient.
    The only difference left is the order of fp32 sums (all-reduce vs one mean), a few ulp per
    step: after 6 SGD steps the learned context agrees to 1e-5, where a different batch
    composition (the old per-process sampling) moves it by ~1e-2."""
    from safetensors.torch import load_file

    root = write_image_folder(tmp_path / "images", per_split={"train": 4, "val": 2, "test": 2})
    common = ["trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}", "seed=1",
              "data.dataset=imagefolder", f"data.root={root}", "data.batch_size=4",
              "trainer.max_epochs=2", "optim.warmup_epochs=0", "optim.lr=0.05", "trainer.accelerator=cpu"]
    _adapt("fit", str(ROOT / "recipes/coop/tiny.yaml"), "trainer.devices=2", "trainer.strategy=ddp",
           "run_name=ddp", *common, cwd=tmp_path)
    _adapt("fit", str(ROOT / "recipes/coop/tiny.yaml"), "trainer.devices=1", "run_name=one", *common, cwd=tmp_path)
    ddp = load_file(str(tmp_path / "runs/ddp/adapter/adapter.safetensors"))["prompts.ctx"]
    one = load_file(str(tmp_path / "runs/one/adapter/adapter.safetensors"))["prompts.ctx"]
    assert (ddp - one).abs().max() <= 1e-5
    # and it trained: 3 base classes x 4 shots / batch 4 = 3 steps per epoch
    import torch

    for name in ("ddp", "one"):
        ckpt = torch.load(tmp_path / f"runs/{name}/checkpoints/last.ckpt", weights_only=False)
        assert ckpt["global_step"] == 6, name


def test_prograd_under_ddp_projects_onto_the_global_batchs_teacher_gradient(tmp_path):
    """ProGrad takes the teacher's gradient itself (autograd.grad, per process); the engine
    averages it over the processes before the projection, so two processes step as one does at
    the same global batch (without that average they differ by 0.35 here)."""
    from safetensors.torch import load_file

    root = write_image_folder(tmp_path / "images", per_split={"train": 4, "val": 2, "test": 2})
    common = ["trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}", "seed=1",
              "data.dataset=imagefolder", f"data.root={root}", "data.batch_size=4", "method.name=prograd",
              "method.n_ctx=8", "method.ctx_init=''", "trainer.max_epochs=2", "optim.warmup_epochs=0",
              "optim.lr=0.05", "trainer.accelerator=cpu"]
    _adapt("fit", str(ROOT / "recipes/coop/tiny.yaml"), "trainer.devices=2", "trainer.strategy=ddp",
           "run_name=ddp", *common, cwd=tmp_path)
    _adapt("fit", str(ROOT / "recipes/coop/tiny.yaml"), "trainer.devices=1", "run_name=one", *common, cwd=tmp_path)
    ddp = load_file(str(tmp_path / "runs/ddp/adapter/adapter.safetensors"))["prompts.ctx"]
    one = load_file(str(tmp_path / "runs/one/adapter/adapter.safetensors"))["prompts.ctx"]
    assert (ddp - one).abs().max() <= 1e-5
    conflicts = [json.loads((tmp_path / f"runs/{n}/results.json").read_text())["scalars"]["conflict_rate"]
                 for n in ("ddp", "one")]
    assert conflicts[0] == conflicts[1] > 0  # the projection acted, at the same steps


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    root = write_image_folder(tmp_path / "images", per_split={"train": 2, "test": 1})
    proc = subprocess.run([sys.executable, "-m", "adapt.cli", "fit", str(ROOT / "recipes/coop/tiny.yaml"),
                           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                           "data.batch_size=5", "data.shots=2", "data.dataset=imagefolder", f"data.root={root}",
                           "trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "data.batch_size=5 is the global batch, split evenly over the 2 training processes" in proc.stderr


def test_lora_under_ddp_trains_inside_the_backbone_and_evaluates_exactly(tmp_path):
    """A method that trains inside the backbone (peft's LoRA on both towers) under DDP: the
    injected factors train in both processes, one adapter is written, and one process evaluating
    it gets DDP's accuracies. (Its random crops are drawn per process, so the learned values are
    not compared with a one-process run: tests/test_ddp's CoOp case pins the gradient averaging.)"""
    from safetensors.torch import load_file

    root = write_image_folder(tmp_path / "images", per_split={"train": 4, "val": 2, "test": 3})
    common = ["trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}", "seed=1",
              "backbone.name=adapt-tiny-vit", "backbone.pretrained=null", "data.shots=4",
              "data.dataset=imagefolder", f"data.root={root}", "data.batch_size=4", "data.num_workers=0",
              "data.eval_batch_size=4", "trainer.max_steps=4", "optim.lr=0.01", "run_name=ddp"]
    out = _adapt("fit", str(ROOT / "recipes/lora/fewshot.yaml"), "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp", *common, cwd=tmp_path)
    assert out.count("run directory:") == 1
    run_dir = tmp_path / "runs" / "ddp"
    state = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert any(".lora_B." in k and float(v.abs().max()) > 0 for k, v in state.items())  # it trained
    ddp = json.loads((run_dir / "results.json").read_text())
    _adapt("test", str(run_dir), "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
           "trainer.progress_bar=false", cwd=tmp_path)
    single = json.loads((run_dir / "test_results.json").read_text())
    assert single["metrics"] == pytest.approx(ddp["metrics"], abs=1e-6)
