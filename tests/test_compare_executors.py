"""adapt compare under Ray and SLURM (submitit): the same table as the local executor, a killed
worker retried and resumed from its checkpoint, a run's own failure reported and not retried, a
comparison cut short under one executor finished under another, the sbatch script field by field."""
from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from adapt.cli import main
from adapt.compare import compare
from adapt.compare.execute import Job, Progress
from adapt.compare.launcher import LauncherConfig, load_launcher
from adapt.compare.runs import expand_recipes, plan_runs
from adapt.config import RecipeError
from tests import compare_hooks

ROOT = Path(__file__).resolve().parents[1]
WORLD = {"backbone": {"name": "tiny-vit-p4", "pretrained": "world"},
         "data": {"dataset": "world_colour", "root": None, "shots": 4, "num_workers": 0},
         "trainer": {"max_epochs": 4, "checkpoint_every_n_epochs": 1}, "logger": {"csv": False}}


def _world_recipes(tmp_path, methods=("coop", "clipadapter")) -> list[Path]:
    """Seconds-long base-to-novel recipes on the shipped world (both train on cached features,
    so a resumed run must equal an uninterrupted one exactly)."""
    paths = []
    for method in methods:
        path = tmp_path / "recipes" / method / "world.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"_base_": str(ROOT / "recipes" / method / "base2novel.yaml"), **WORLD}), path)
        paths.append(path)
    return paths


def _tables(out: Path) -> list[dict]:
    """comparison.json's tables without what depends on the machine (fit seconds)."""
    tables = json.loads((out / "comparison.json").read_text())["tables"]
    for t in tables:
        for row in t["rows"]:
            row.pop("fit_seconds")
    return tables


def _kill_when_stalled(marker: Path, killed: list) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 600
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            pid = int(marker.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ray_retries_a_killed_worker_from_its_checkpoint_and_reports_a_failing_run(tmp_path):
    import ray  # noqa: F401  (the dev extra installs it: CI runs this test)

    recipes = _world_recipes(tmp_path)
    local = tmp_path / "local"
    assert compare(recipes, seeds=[1, 2], out=local, progress=False)["trained"] == 4

    log, marker, killed = tmp_path / "attempts.jsonl", tmp_path / "stalled.pid", []
    watcher = _kill_when_stalled(marker, killed)
    hook = functools.partial(compare_hooks.fit, log=log, stall="coop-world/seed1", marker=marker,
                             fail_once="clipadapter-world/seed2")
    out = tmp_path / "ray"
    res = compare(recipes, seeds=[1, 2], out=out, fit=hook, progress=True,
                  launcher=LauncherConfig(executor="ray", jobs=2, num_cpus=2, max_retries=2))
    watcher.join(timeout=5)
    tries = compare_hooks.attempts(log)
    # the killed run: a second attempt in another worker process, continuing from its checkpoint
    assert killed and [t["resume"] for t in tries["coop-world/seed1"]] == [False, True]
    assert tries["coop-world/seed1"][0]["pid"] == killed[0] != tries["coop-world/seed1"][1]["pid"]
    # the run that raised: reported with its error, attempted once
    assert len(tries["clipadapter-world/seed2"]) == 1
    assert [(m.label, m.seed) for m in res["missing"]] == [("clipadapter-world", 2)]
    assert "deliberate failure" in res["missing"][0].reason
    assert {k: len(v) for k, v in tries.items() if k not in ("coop-world/seed1", "clipadapter-world/seed2")} \
        == {"coop-world/seed2": 1, "clipadapter-world/seed1": 1}
    assert res["trained"] == 3 and "Runs that did not finish" in (out / "comparison.md").read_text()

    # cut short under Ray, finished under SLURM (submitit's local executor): only the missing run
    again = compare(recipes, seeds=[1, 2], out=out, progress=False,
                    launcher=LauncherConfig(executor="slurm", cluster="local"))
    assert again["trained"] == 1 and again["missing"] == []
    # cached-feature methods: the resumed run and the others equal the local executor's, exactly
    assert _tables(out) == _tables(local)
    baselines = [p for p in out.glob("runs/*/seed*/results.json") if "zeroshot_metrics" in json.loads(p.read_text())]
    assert [p.parent.relative_to(out / "runs").as_posix() for p in baselines] == ["coop-world/seed1"]


def test_slurm_array_runs_end_to_end_and_a_cut_short_one_finishes_locally(tmp_path):
    recipes = _world_recipes(tmp_path)
    out = tmp_path / "slurm"
    res = compare(recipes, seeds=[1, 2], out=out, progress=False,
                  launcher=LauncherConfig(executor="slurm", cluster="local", jobs=2))
    assert res["trained"] == 4 and res["missing"] == []
    index = (out / "slurm" / "array.tsv").read_text().splitlines()
    assert [line.split("\t")[1] for line in index] == ["coop/world_colour/seed1", "clipadapter/world_colour/seed1",
                                                       "coop/world_colour/seed2", "clipadapter/world_colour/seed2"]
    full = _tables(out)
    run = out / "runs" / "clipadapter-world" / "seed2"
    (run / "results.json").unlink()  # stopped after its last checkpoint, before its results
    calls = []

    def fit(recipe):
        from adapt.run import run_fit

        calls.append((str(recipe.run_name), bool(recipe.resume)))
        return run_fit(recipe)

    again = compare(recipes, seeds=[1, 2], out=out, fit=fit, progress=False)  # local executor
    assert calls == [("clipadapter-world/seed2", True)] and again["trained"] == 1
    assert _tables(out) == full


def _sbatch_flags(script: str) -> dict:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value if _ else True
    return flags


def test_dry_run_prints_the_sbatch_script_of_the_launcher_section_and_submits_nothing(tmp_path, capsys):
    recipes = _world_recipes(tmp_path)
    listing = tmp_path / "recipes" / "cluster.yaml"
    OmegaConf.save(OmegaConf.create({
        "recipes": [str(p.relative_to(listing.parent)) for p in recipes],
        "launcher": {"executor": "slurm", "partition": "gpu", "account": "lab", "qos": "high", "gpus": 1,
                     "time_min": 120, "mem_gb": 32, "threads": 4, "jobs": 3, "setup": ["module load cuda"]}}),
        listing)
    out = tmp_path / "cmp"
    assert main(["compare", str(listing), "--seeds", "1", "2", "--out", str(out), "--dry-run",
                 "launcher.account=other"]) == 0
    printed = capsys.readouterr().out
    script = printed[printed.index("#!/bin/bash"):]
    flags = _sbatch_flags(script)
    folder = (out / "slurm").absolute()
    assert flags == {"partition": "gpu", "account": "other", "qos": "high", "gpus-per-node": "1", "time": "120",
                     "mem": "32GB", "cpus-per-task": "4", "array": "0-3%3", "signal": "USR1@90", "requeue": True,
                     "job-name": "adapt-compare", "nodes": "1", "wckey": "submitit", "open-mode": "append",
                     "output": f"{folder}/%A_%a_0_log.out", "error": f"{folder}/%A_%a_0_log.err"}
    body = script.splitlines()
    assert "module load cuda" in body and any(line.startswith(f"export PYTHONPATH={ROOT}") for line in body)
    assert any("-m submitit.core._submit" in line and str(folder) in line for line in body)
    assert "4 runs to run (0 finished, reused) under --executor slurm" in printed
    # a run on two GPUs: one task per GPU (Lightning's DDP under SLURM); CPUs from data workers
    from adapt.compare.slurm_executor import sbatch_parameters

    jobs = [Job(0, "x", 1, OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 2},
                                             "data": {"num_workers": 3}}), out)]
    params = sbatch_parameters(jobs, LauncherConfig(executor="slurm"))
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["cpus_per_task"]) == (2, 2, 4)
    assert printed.index("coop/world_colour/seed1") < printed.index("clipadapter/world_colour/seed2")
    assert not out.exists()  # nothing submitted, nothing written


def test_launcher_errors_name_the_key_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="Did you mean 'partition'"):
        load_launcher(overrides=["partiton=gpu"])
    with pytest.raises(RecipeError, match="not one of local, ray, slurm"):
        load_launcher(overrides=["executor=sge"])
    with pytest.raises(RecipeError, match="local executor: it runs one run at a time.*--executor ray --jobs 2"):
        load_launcher(executor="local", jobs=2)
    with pytest.raises(RecipeError, match="launcher.threads must be >= 1"):
        load_launcher(overrides=["threads=0"])
    # a missing extra: one line naming it, before any run starts
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    calls = []
    with pytest.raises(RecipeError, match=r'--executor ray needs the ray package: pip install "adapt-clip\[ray\]"'):
        compare(_world_recipes(tmp_path)[:1], seeds=[1], out=tmp_path / "c", fit=calls.append, progress=False,
                launcher=LauncherConfig(executor="ray"))
    assert calls == []
    assert main(["compare", *map(str, _world_recipes(tmp_path)[:1]), "--out", str(tmp_path / "c"),
                 "--executor", "ray"]) == 2


def test_one_zero_shot_baseline_per_dataset_setting_and_shots(tmp_path):
    recipes = _world_recipes(tmp_path, ("coop", "clipadapter", "kgcoop"))
    plan = plan_runs(recipes, [1, 2], tmp_path / "o", ["data.shots=2"])
    marked = [(label, seed) for label, seed, r, _ in plan.items if r.baseline]
    assert marked == [("coop-world", 1)]  # one for three recipes (of two batch sizes)
    # other prompts are another zero-shot model: its own baseline
    other = tmp_path / "recipes" / "kgcoop" / "prompts.yaml"
    OmegaConf.save(OmegaConf.create({"_base_": str(recipes[2]), "data": {"templates": ["a {} thing."]}}), other)
    plan = plan_runs(recipes + [other], [1, 2], tmp_path / "o1")
    assert [(label, seed) for label, seed, r, _ in plan.items if r.baseline] == [("coop-world", 1),
                                                                                ("kgcoop-prompts", 1)]
    # another shots setting is another table: its own baseline; a zero-shot recipe needs none
    zs = tmp_path / "recipes" / "zeroshot" / "world.yaml"
    zs.parent.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({**WORLD, "method": {"name": "zeroshot"},
                                     "data": {**WORLD["data"], "setting": "base2novel"}}), zs)
    plan = plan_runs([recipes[0], zs], [3, 4], tmp_path / "o2")
    assert not any(r.baseline for _, _, r, _ in plan.items)
    listing = expand_recipes(recipes)
    plan = plan_runs(listing, [1], tmp_path / "o3", ["data.shots=8"])
    assert sum(r.baseline for _, _, r, _ in plan.items) == 1


def test_progress_line_counts_runs_per_recipe(tmp_path):
    from omegaconf import OmegaConf as OC

    recipe = OC.create({"method": {"name": "coop"}, "data": {"dataset": "d"}})
    jobs = [Job(i, label, seed, recipe, tmp_path / f"{label}{seed}") for i, (label, seed) in
            enumerate([("coop-a", 1), ("kg-a", 1), ("coop-a", 2)])]
    lines = []

    class Stream:
        def write(self, text):
            lines.extend(t for t in text.splitlines() if t)

        def flush(self):
            pass

    bar = Progress(jobs, reused=2, stream=Stream())
    bar.set(jobs[0], "running")
    bar.set(jobs[0], "running")  # no change: no line
    bar.set(jobs[0], "done")
    bar.set(jobs[1], "failed")
    assert len(lines) == 4 and lines[2] == "compare: kg-a seed 1 failed"
    assert lines[-1].endswith("1/3 done, 0 running, 1 failed, 2 reused | coop-a 1 done; kg-a 1 failed")
    assert jobs[0].name == "coop/d/seed1"


def test_ray_resources_follow_the_recipe():
    from adapt.compare.ray_executor import gpus_of

    def r(accelerator, devices):
        return OmegaConf.create({"trainer": {"accelerator": accelerator, "devices": devices}})

    plain = LauncherConfig(executor="ray")
    assert gpus_of(r("cpu", 4), plain, True) == 0
    assert gpus_of(r("gpu", 2), plain, False) == 2 and gpus_of(r("cuda", [0, 3, 5]), plain, False) == 3
    assert gpus_of(r("auto", "auto"), plain, False) == 0 and gpus_of(r("auto", "auto"), plain, True) == 1
    assert gpus_of(r("gpu", "2"), plain, False) == 2
    assert gpus_of(r("gpu", 2), LauncherConfig(executor="ray", gpus=0), True) == 0


def test_slurm_refuses_to_submit_beside_an_earlier_array_still_running(tmp_path, monkeypatch):
    import submitit

    recipes = _world_recipes(tmp_path)[:1]
    out = tmp_path / "cmp"
    (out / "slurm").mkdir(parents=True)
    (out / "slurm" / "array.json").write_text(json.dumps({"cluster": "slurm", "job_id": "4242", "runs": 2}))
    states = {"4242_0": "COMPLETED", "4242_1": "RUNNING"}

    class FakeJob:
        def __init__(self, folder, job_id):
            self.state = states[job_id]

    monkeypatch.setattr(submitit, "SlurmJob", FakeJob)
    with pytest.raises(RecipeError, match=r"array 4242 .* still has 1 run\(s\) queued or running.*scancel 4242"):
        compare(recipes, seeds=[1], out=out, fit=pytest.fail, progress=False,
                launcher=LauncherConfig(executor="slurm"))
    states["4242_1"] = "FAILED"  # the earlier array is over: a new one would be submitted (needs SLURM here)
    with pytest.raises(RuntimeError, match="srun"):
        compare(recipes, seeds=[1], out=out, fit=pytest.fail, progress=False,
                launcher=LauncherConfig(executor="slurm"))


def test_a_missing_submitit_is_named_with_its_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)
    assert main(["compare", *map(str, _world_recipes(tmp_path)[:1]), "--out", str(tmp_path / "c"),
                 "--executor", "slurm", "--dry-run"]) == 2
    assert 'needs the submitit package: pip install "adapt-clip[slurm]"' in capsys.readouterr().err


def test_the_cli_imports_no_torch_before_a_ray_cluster_can_start():
    """`adapt compare --executor ray` starts its cluster before the recipe machinery is imported
    (ray_cluster.prestart): that overlap needs adapt.cli and the launcher section to stay light."""
    import subprocess
    import sys

    code = ("import sys, adapt.cli, adapt.compare.launcher, adapt.compare.ray_cluster; "
            "print(sorted(m for m in ('torch', 'open_clip', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prestart_warms_a_local_cluster_and_stop_leaves_a_callers_cluster_running():
    import ray

    from adapt.compare import ray_cluster
    from adapt.compare.launcher import LauncherConfig

    ray_cluster.prestart(LauncherConfig())  # the local executor: no cluster
    assert not ray.is_initialized()
    ray_cluster.prestart(LauncherConfig(executor="ray", jobs=2, threads=1))
    try:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        warm = ray_cluster._owned["warm"]
        assert len(warm) == 2 and all(pid > 0 for pid in ray.get(warm, timeout=120))  # adapt.run imported
        assert ray_cluster.start(LauncherConfig(executor="ray")) is ray  # the same cluster, not a second
    finally:
        ray_cluster.stop()
    assert not ray.is_initialized()
    ray.init(num_cpus=1, log_to_driver=False, configure_logging=False)  # the caller's own cluster
    try:
        ray_cluster.start(LauncherConfig(executor="ray"))
        ray_cluster.stop()
        assert ray.is_initialized()
    finally:
        ray.shutdown()
