"""``--executor ray``: every run of a comparison is one Ray task.

A task asks for the CPUs and GPUs its run needs (``launcher.threads``, the recipe's
``trainer.devices`` on GPUs) and is named method/dataset/seed, as Ray's dashboard and
``ray list tasks`` show it. ``launcher.address`` null starts a local cluster for the comparison
(stopped at its end; ``launcher.num_cpus`` CPUs, default jobs x threads); ``auto`` or an address
joins a running one, whose nodes must have adapt installed.

Failures: a task whose worker process dies (killed, out of memory, a lost node) is run again by
Ray (``max_retries``) and the new attempt continues from the checkpoint in the run directory
(``execute.run_one``); a run that raises is reported, never retried (``retry_exceptions=False``:
its own error would only repeat). At most ``launcher.jobs`` tasks are handed to Ray at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

from omegaconf import DictConfig

from adapt.compare import ray_cluster
from adapt.compare.execute import Job, Outcome, Progress, error_text, recipe_text, run_one
from adapt.compare.launcher import LauncherConfig


def gpus_of(recipe: DictConfig, launcher: LauncherConfig, cluster_has_gpus: bool) -> int:
    """GPUs of one run: ``launcher.gpus``, else the recipe's devices when it trains on GPUs (or
    on ``auto`` where there are GPUs)."""
    if launcher.gpus is not None:
        return launcher.gpus
    accelerator, devices = str(recipe.trainer.accelerator), recipe.trainer.devices
    if accelerator == "cpu" or (accelerator == "auto" and not cluster_has_gpus):
        return 0
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, str):  # "auto" (one per run), "2", or ids "0,1"
        if devices.isdigit():
            return max(int(devices), 1)
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else 1
    return len(list(devices))  # a list of device ids


def _task(recipe_yaml: str, run_dir: str, fit, threads: int) -> dict:
    return run_one(recipe_yaml, run_dir, fit, threads)


def run_ray(jobs: Sequence[Job], fit: Callable, launcher: LauncherConfig, progress: Progress) -> dict[int, Outcome]:
    ray = ray_cluster.start(launcher)  # or the one ``prestart`` brought up while the comparison planned
    try:
        return _drive(ray, jobs, fit, launcher, progress)
    finally:
        ray_cluster.stop()  # only a cluster this process started


def _drive(ray, jobs, fit, launcher, progress) -> dict[int, Outcome]:
    task = ray.remote(_task)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    waiting, in_flight, out = list(jobs), {}, {}
    limit = launcher.jobs or len(waiting)
    while waiting or in_flight:
        while waiting and len(in_flight) < limit:
            job = waiting.pop(0)
            threads = launcher.threads or 1
            ref = task.options(name=job.name, num_cpus=threads, num_gpus=gpus_of(job.recipe, launcher, has_gpus),
                               max_retries=launcher.max_retries, retry_exceptions=False
                               ).remote(recipe_text(job.recipe), str(job.run_dir), fit, threads)
            in_flight[ref] = job
            progress.submitted(job)
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        progress.poll()
        for ref in ready:
            job = in_flight.pop(ref)
            out[job.index] = _outcome(ray, ref, launcher)
            progress.set(job, "failed" if out[job.index].error else "done")
    return out


def _outcome(ray, ref, launcher: LauncherConfig) -> Outcome:
    try:
        return Outcome(ray.get(ref))
    except ray.exceptions.RayTaskError as err:  # the run raised: reported, not retried
        cause = getattr(err, "cause", None)
        return Outcome(error=f"failed: {error_text(cause) if cause is not None else str(err).splitlines()[0]}")
    except ray.exceptions.RayError as err:  # its worker died more often than max_retries allows
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return Outcome(error=f"failed: {type(err).__name__} after {launcher.max_retries} retries: {first}")
