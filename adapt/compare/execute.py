"""One run of a comparison, wherever it executes, and the progress line over all of them.

``run_one`` is what every executor calls for a run (in this process, a Ray worker or a SLURM array
task): it looks at the run directory *when the attempt starts* (a retried Ray task or a requeued
array task sees the checkpoint its previous attempt left) and continues the run from it, starts it
again when it stopped before its first checkpoint, or trains it. The recipe travels as resolved
YAML, so a worker needs nothing but adapt.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from adapt.rundir import read_status, resumable_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A run the comparison still needs: its place in the plan, recipe and run directory."""
    index: int
    label: str
    seed: int
    recipe: DictConfig
    run_dir: Path

    @property
    def name(self) -> str:
        """method/dataset/seed: the name a scheduler shows (Ray's dashboard, squeue)."""
        return f"{self.recipe.method.name}/{self.recipe.data.dataset}/seed{self.seed}"


@dataclass
class Outcome:
    """A job's end: its results, or why it has none."""
    results: Optional[dict] = None
    error: str = ""


def continue_or_start(recipe: DictConfig, run_dir: Path) -> DictConfig:
    """The recipe for this attempt: ``resume`` from a checkpoint an earlier attempt wrote (ours or
    Lightning's SLURM requeue one), ``overwrite`` when one stopped before its first checkpoint
    (its files are moved aside, never deleted), else as it is."""
    if resumable_checkpoint(run_dir) is not None:
        recipe.resume = True
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        recipe.overwrite = True
    return recipe


def run_one(recipe_yaml: str, run_dir: str, fit: Optional[Callable] = None,
            threads: Optional[int] = None) -> dict:
    """Train one run of a comparison (from its resolved recipe) and return its results."""
    from adapt.config import resolve_recipe

    if threads:
        import torch

        torch.set_num_threads(int(threads))  # under Ray also OMP_NUM_THREADS, set from num_cpus
    if fit is None:
        from adapt.run import run_fit as fit
    recipe = continue_or_start(resolve_recipe(OmegaConf.create(recipe_yaml)), Path(run_dir))
    return fit(recipe)


def recipe_text(recipe: DictConfig) -> str:
    return OmegaConf.to_yaml(recipe, resolve=True)


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Progress:
    """Running / done / failed per recipe, one log line whenever it changes (plain lines: they
    read the same on a terminal, in a CI log and in a SLURM job's output)."""

    def __init__(self, jobs: Sequence[Job], reused: int = 0, enabled: bool = True, stream=None):
        self.labels = list(dict.fromkeys(j.label for j in jobs))
        self.state: dict[int, str] = {j.index: "pending" for j in jobs}
        self.label_of = {j.index: j.label for j in jobs}
        self.jobs = {j.index: j for j in jobs}
        self.dirs = {j.index: j.run_dir for j in jobs}
        self.since: dict[int, float] = {}
        self.reused, self.enabled = reused, enabled
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def set(self, job: Job, state: str) -> None:
        if self.state.get(job.index) == state:
            return
        self.state[job.index] = state
        if state != "pending":
            self.since.pop(job.index, None)
        if state == "failed":
            self._print(f"compare: {job.label} seed {job.seed} failed")
        self._print(self.line())

    def submitted(self, job: Job) -> None:
        """Handed to a scheduler: it counts as running once its run directory says so."""
        self.since[job.index] = time.time()

    def poll(self) -> None:
        """Jobs a scheduler started: their ``status.json`` (written by the run) says running."""
        for index, since in list(self.since.items()):
            status = read_status(self.dirs[index])
            if self.state[index] == "pending" and status.get("state") == "running" \
                    and status.get("time", 0) >= since - 1:
                self.set(self.jobs[index], "running")

    def counts(self, label: Optional[str] = None) -> dict[str, int]:
        out = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        for index, state in self.state.items():
            if label is None or self.label_of[index] == label:
                out[state] += 1
        return out

    def line(self) -> str:
        total = self.counts()
        per = []
        for label in self.labels:
            c = self.counts(label)
            parts = [f"{c[k]} {k}" for k in ("running", "done", "failed") if c[k]]
            per.append(f"{label} {', '.join(parts) or 'waiting'}")
        return (f"compare [{time.monotonic() - self.start:.0f}s] {total['done']}/{len(self.state)} done, "
                f"{total['running']} running, {total['failed']} failed"
                + (f", {self.reused} reused" if self.reused else "") + " | " + "; ".join(per))

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


def run_local(jobs: Sequence[Job], fit: Callable, launcher, progress: Progress) -> dict[int, Outcome]:
    """Today's executor: one run after another in this process (``launcher.threads`` applies
    during the runs only)."""
    import torch

    threads, out = torch.get_num_threads(), {}
    try:
        _run_each(jobs, fit, launcher, progress, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _run_each(jobs, fit, launcher, progress, out) -> None:
    for job in jobs:
        progress.set(job, "running")
        try:
            out[job.index] = Outcome(run_one(recipe_text(job.recipe), str(job.run_dir), fit, launcher.threads))
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one failing run must not lose the others' table
            log.error("%s seed %s failed: %s", job.label, job.seed, err)
            out[job.index] = Outcome(error=f"failed: {error_text(err)}")
        progress.set(job, "failed" if out[job.index].error else "done")
