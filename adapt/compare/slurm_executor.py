"""``--executor slurm``: the runs of a comparison as one SLURM job array (submitit), one run per
array task.

Partition, account, QoS, constraint, time, memory, GPUs and CPUs per task come from the launcher
section (GPUs default to the largest ``trainer.devices`` of the recipes that train on GPUs).
The time limit and pre-emption: the array asks SLURM for SIGUSR1 ``signal_delay_s`` before the
end (``--signal=USR1@90``, replacing submitit's USR2) and for ``--requeue``; Lightning's SLURM
environment catches SIGUSR1, writes ``hpc_ckpt_*.ckpt`` into the run directory and requeues the
array task. Any new attempt of a task (requeued by Lightning, or by SLURM after a pre-emption)
continues from the run's checkpoint (``execute.run_one``). Not tested on a real cluster here: the
tests run the array through submitit's local executor and check the script field by field.
A run that raises is reported with its error.

``--dry-run`` prints the sbatch script that would be submitted (rendered by submitit's own
``_make_sbatch_string``, the function its SlurmExecutor submits with) and submits nothing.
``launcher.cluster: local`` / ``debug`` runs the same array through submitit's LocalExecutor
(subprocesses) / DebugExecutor (this process), on a machine without SLURM.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from adapt.compare.execute import Job, Outcome, Progress, error_text, recipe_text, run_one
from adapt.compare.launcher import LauncherConfig, require, worker_env
from adapt.compare.ray_executor import gpus_of
from adapt.io import atomic_write_json
from adapt.structured import RecipeError


def folder_of(launcher: LauncherConfig, out: Path) -> Path:
    return Path(launcher.folder).expanduser().absolute() if launcher.folder else (Path(out) / "slurm").absolute()


def sbatch_parameters(jobs: Sequence[Job], launcher: LauncherConfig) -> dict:
    """submitit's SlurmExecutor parameters (sbatch's names) for the array of ``jobs``."""
    import adapt

    gpus = max(gpus_of(j.recipe, launcher, cluster_has_gpus=False) for j in jobs)
    workers = max(int(j.recipe.data.num_workers) for j in jobs)
    root = shlex.quote(str(Path(adapt.__file__).resolve().parents[1]))
    params = {
        "job_name": "adapt-compare",
        "time": launcher.time_min,
        "cpus_per_task": launcher.cpus_per_task or launcher.threads or 1 + workers,
        "array_parallelism": launcher.jobs or 256,
        "signal_delay_s": launcher.signal_delay_s,
        # Lightning's SLURM auto-requeue listens for SIGUSR1 (submitit's own USR2 is replaced)
        "additional_parameters": {"signal": f"USR1@{launcher.signal_delay_s}", "requeue": True},
        # the tasks import the adapt that submitted them
        "setup": list(launcher.setup) + [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if gpus > 1:  # a run on several GPUs: one task per GPU, Lightning's SLURM convention for DDP
        params["ntasks_per_node"] = gpus
    if launcher.mem_gb is not None:
        from submitit.slurm.slurm import _convert_mem

        params["mem"] = _convert_mem(launcher.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launcher, key):
            params[key] = getattr(launcher, key)
    return params


def render_sbatch(jobs: Sequence[Job], launcher: LauncherConfig, out: Path) -> str:
    """The array's sbatch script, as submitit would write it (nothing is submitted)."""
    require("submitit", "slurm")
    from submitit.slurm.slurm import _make_sbatch_string

    folder = folder_of(launcher, out)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=len(jobs),
                               **sbatch_parameters(jobs, launcher))


def array_index(jobs: Sequence[Job]) -> str:
    """Which run each array task is (SLURM names array tasks by number only)."""
    return "\n".join(f"{i}\t{j.name}\t{j.run_dir}" for i, j in enumerate(jobs))


def _executor(submitit, launcher: LauncherConfig, jobs: Sequence[Job], out: Path):
    folder = folder_of(launcher, out)
    if launcher.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if launcher.cluster == "local":
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=launcher.time_min,
                             gpus_per_node=max(gpus_of(j.recipe, launcher, False) for j in jobs))
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=3)
    ex.update_parameters(**sbatch_parameters(jobs, launcher))
    return ex


ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


def unfinished_array(submitit, folder: Path) -> list[str]:
    """Array tasks of an earlier submission from this folder that SLURM still runs or queues."""
    record = folder / "array.json"
    if not record.is_file():
        return []
    previous = json.loads(record.read_text())
    if previous.get("cluster") != "slurm":
        return []
    ids = [f"{previous['job_id']}_{i}" for i in range(previous["runs"])]
    return [i for i in ids if submitit.SlurmJob(folder, i).state.split(" ")[0] in ACTIVE]


def run_slurm(jobs: Sequence[Job], fit: Callable, launcher: LauncherConfig, progress: Progress,
              out: Path) -> dict[int, Outcome]:
    submitit = require("submitit", "slurm")
    folder = folder_of(launcher, out)
    busy = unfinished_array(submitit, folder) if launcher.cluster == "slurm" else []
    if busy:  # its tasks would write the same run directories as a new array
        array = busy[0].split("_")[0]
        raise RecipeError(f"the array {array} submitted earlier from {folder} still has {len(busy)} run(s) "
                          f"queued or running; wait for it (adapt report shows what has finished) or stop it "
                          f"with scancel {array}, then run this command again")
    ex = _executor(submitit, launcher, jobs, out)
    # torch's default thread count follows the CPUs SLURM gives the task (its affinity)
    threads = launcher.threads
    with worker_env():  # sbatch exports the environment; local tasks inherit it
        handles = ex.map_array(run_one, [recipe_text(j.recipe) for j in jobs], [str(j.run_dir) for j in jobs],
                               [fit] * len(jobs), [threads] * len(jobs))
    (folder / "array.tsv").write_text(array_index(jobs) + "\n")
    array = handles[0].job_id.split("_")[0] if handles else ""
    atomic_write_json(folder / "array.json", {"cluster": launcher.cluster, "job_id": array, "runs": len(jobs)})
    if handles and launcher.cluster == "slurm":
        print(f"compare: submitted array {array} ({len(jobs)} runs); logs in {folder}", file=sys.stderr)
    for job in jobs:
        progress.submitted(job)
    try:
        return _wait(jobs, handles, launcher, progress)
    except KeyboardInterrupt:
        if launcher.cluster == "slurm":
            print(f"\ncompare: stopped waiting; the array {array} keeps running on the cluster. `adapt report "
                  f"{out}/runs` tables what has finished; rerun this command once it is done (or scancel "
                  f"{array})", file=sys.stderr)
        raise


def _wait(jobs: Sequence[Job], handles, launcher: LauncherConfig, progress: Progress) -> dict[int, Outcome]:
    waiting, out_ = dict(zip((j.index for j in jobs), zip(jobs, handles))), {}
    poll = 15.0 if launcher.cluster == "slurm" else 0.5
    while waiting:
        progress.poll()
        for index, (job, handle) in list(waiting.items()):
            if launcher.cluster != "debug" and not handle.done():
                continue
            try:
                out_[index] = Outcome(handle.result())
            except Exception as err:  # the run raised, or the task was killed / timed out
                out_[index] = Outcome(error=f"failed: {_reason(err)}")
            del waiting[index]
            progress.set(job, "failed" if out_[index].error else "done")
        if waiting:
            time.sleep(poll)
    return out_


def _reason(err: BaseException) -> str:
    """submitit wraps a task's error in a long text ending with the original's last line."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else error_text(err)
