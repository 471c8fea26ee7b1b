"""Where the runs of a comparison execute: the ``launcher`` section.

A compare list file may carry it beside ``recipes:``; ``--executor`` / ``--jobs`` and
``launcher.KEY=VALUE`` on the command line override it. Nothing here changes what a run computes
(those keys are not part of a recipe, so a comparison may be resumed under another executor).

    launcher:
      executor: slurm          # local (default) | ray | slurm
      partition: gpu
      gpus: 1                  # per run (default: the recipe's trainer.devices on GPUs)
      time_min: 120
      mem_gb: 32
      account: my-lab

The executors themselves are optional extras (``pip install "adapt-clip[ray]"`` /
``"adapt-clip[slurm]"``): ``require`` names the extra when the package is missing.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from adapt.structured import RecipeError, check_choice, merge_checked

EXECUTORS = ("local", "ray", "slurm")
EXTRAS = {"ray": "ray", "submitit": "slurm"}  # module -> the extra that installs it


@dataclass
class LauncherConfig:
    executor: str = "local"  # local | ray | slurm
    # runs at once: ray (default: as many as the cluster's CPUs / GPUs fit), slurm (the array's
    # parallelism, default 256); local runs one at a time
    jobs: Optional[int] = None
    # CPU threads of each run (torch.set_num_threads; a Ray task's num_cpus; SLURM's
    # cpus_per_task unless that is given). Default: 1 under Ray; locally and under SLURM torch's
    # own default (the CPUs the process may use)
    threads: Optional[int] = None
    # GPUs of each run; default: trainer.devices when trainer.accelerator is gpu / cuda, the same
    # under "auto" when the Ray cluster (or the SLURM launcher: never) has GPUs, else 0
    gpus: Optional[int] = None
    # ray: null starts a local cluster for the comparison (stopped at its end); "auto" or an
    # address (ray://host:10001) joins an existing one
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # ray, local cluster: CPUs it offers (default: jobs x threads)
    max_retries: int = 3  # ray: a task whose worker process died runs again (resuming)
    # slurm (one array task per run); cluster: slurm, or local / debug to run the same array on
    # this machine through submitit (tests, a workstation)
    cluster: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 60
    mem_gb: Optional[float] = None
    cpus_per_task: Optional[int] = None  # default: threads, else 1 + data.num_workers
    signal_delay_s: int = 90  # SIGUSR1 this long before the time limit: Lightning checkpoints, requeues
    setup: list[str] = field(default_factory=list)  # shell lines before the run (module load ...)
    folder: Optional[str] = None  # submitit's scripts and logs (default: OUT/slurm)

    def __post_init__(self) -> None:
        check_choice("launcher.executor", self.executor, EXECUTORS)
        check_choice("launcher.cluster", self.cluster, ("slurm", "local", "debug"))
        for key in ("jobs", "threads", "num_cpus", "cpus_per_task"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise RecipeError(f"launcher.{key} must be >= 1 (or null), got {value}")
        if self.gpus is not None and self.gpus < 0:
            raise RecipeError(f"launcher.gpus must be >= 0, got {self.gpus}")
        if self.max_retries < 0 or self.time_min < 1:
            raise RecipeError("launcher.max_retries must be >= 0 and launcher.time_min >= 1")
        if self.executor == "local" and self.jobs not in (None, 1):
            raise RecipeError(
                f"--jobs {self.jobs} with the local executor: it runs one run at a time. For runs in "
                f"parallel on this machine use --executor ray --jobs {self.jobs} (pip install "
                "\"adapt-clip[ray]\"; each run gets its own process and threads)")


def launcher_sections(paths: Sequence) -> list[Any]:
    """The ``launcher:`` sections of the list files among ``paths``, in order."""
    out = []
    for raw in paths:
        path = Path(raw)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            cfg = OmegaConf.load(path)
            if isinstance(cfg, DictConfig) and "recipes" in cfg and "launcher" in cfg:
                out.append(cfg.launcher)
    return out


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(recipe overrides, ``launcher.KEY=VALUE`` overrides without the prefix)."""
    recipe = [o for o in overrides if not o.startswith("launcher.")]
    launcher = [o[len("launcher."):] for o in overrides if o.startswith("launcher.")]
    return recipe, launcher


def load_launcher(recipe_paths: Sequence = (), overrides: Sequence[str] = (),
                  executor: Optional[str] = None, jobs: Optional[int] = None) -> LauncherConfig:
    """List files' sections, then ``launcher.*`` overrides, then the ``--executor`` / ``--jobs``
    flags; one message naming the key for anything unknown or wrong."""
    layers = launcher_sections(recipe_paths)
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    flags = {k: v for k, v in (("executor", executor), ("jobs", jobs)) if v is not None}
    layers.append(OmegaConf.create(flags))
    base = OmegaConf.structured(LauncherConfig)
    merged = OmegaConf.merge(*[OmegaConf.create(layer) for layer in layers]) if layers else {}
    return merge_checked(base, merged, "launcher", LauncherConfig)


def require(module: str, executor: str):
    """Import ``module`` for ``executor``, or stop with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RecipeError(f"--executor {executor} needs the {module} package: pip install "
                          f"\"adapt-clip[{EXTRAS[module]}]\" (or pip install {module})") from None


@contextlib.contextmanager
def worker_env() -> Iterator[None]:
    """While workers are started (a Ray cluster, submitit's processes, sbatch, which exports the
    environment): they import the adapt this process runs (its folder first on PYTHONPATH)."""
    import adapt

    root = str(Path(adapt.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if p != root])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
