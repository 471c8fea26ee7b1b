"""The Ray cluster of a comparison: started (and its workers warmed) as early as possible, stopped
at the end by the process that started it.

``adapt compare --executor ray`` calls ``prestart`` before it imports the recipe machinery (torch,
open_clip, Lightning: seconds), so the local cluster comes up and each worker imports ``adapt.run``
while this process plans the comparison, instead of after it. A cluster this process did not start
(``ray.init`` by the caller, ``launcher.address``) is used as it is and left running.
"""
from __future__ import annotations

import os

from adapt.compare.launcher import LauncherConfig, require, worker_env

_owned = {"ray": None, "warm": []}  # the ray module when this process started the cluster


def _warm() -> int:
    import adapt.run  # noqa: F401  what every run of the comparison imports first
    return os.getpid()


def start(launcher: LauncherConfig, warm: bool = False):
    """The ray module with a cluster up: the caller's, or one started here (a local one with
    ``launcher.num_cpus`` CPUs, default jobs x threads; or ``launcher.address``). ``warm``: also
    hand each slot of a local cluster a task that imports ``adapt.run``, not waited for."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        return ray
    with worker_env():  # the cluster's workers import this adapt
        if launcher.address is None:
            threads = launcher.threads or 1
            cpus = launcher.num_cpus or (launcher.jobs * threads if launcher.jobs else None)
            ray.init(num_cpus=cpus, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=launcher.address, log_to_driver=False, configure_logging=False)
    _owned["ray"] = ray
    if warm and launcher.address is None:
        slots = launcher.jobs or max(int(ray.cluster_resources().get("CPU", 1)) // (launcher.threads or 1), 1)
        task = ray.remote(_warm).options(name="adapt/warm-up", num_cpus=launcher.threads or 1)
        _owned["warm"] = [task.remote() for _ in range(slots)]
    return ray


def prestart(launcher: LauncherConfig) -> None:
    """``start`` with warm workers, for a comparison about to run under Ray; a missing ray package
    is left for the executor to report (a dry run or a finished comparison does not need it)."""
    if launcher.executor != "ray":
        return
    try:
        start(launcher, warm=True)
    except Exception:  # noqa: BLE001  the executor starts it again and reports what is wrong
        stop()


def stop() -> None:
    """Stop the cluster if this process started it (idempotent)."""
    ray, _owned["ray"], _owned["warm"] = _owned["ray"], None, []
    if ray is not None and ray.is_initialized():
        ray.shutdown()
