"""Test-only ``fit`` functions for comparisons run by other processes (Ray workers, submitit
tasks): importable by them (the executors put this checkout first on PYTHONPATH), and picklable
as ``functools.partial`` of a module-level function.

Every attempt appends (run, pid, resume) to ``log`` (one JSON line), so a test sees how often a
run was attempted, in which process, and whether it continued from a checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional


def _record(log: Path, recipe) -> None:
    with open(log, "a") as f:
        f.write(json.dumps({"run": str(recipe.run_name), "pid": os.getpid(), "resume": bool(recipe.resume)}) + "\n")


def attempts(log: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in Path(log).read_text().splitlines():
        entry = json.loads(line)
        out.setdefault(entry["run"], []).append(entry)
    return out


def fit(recipe, log: Path, stall: Optional[str] = None, marker: Optional[Path] = None,
        stall_epoch: int = 2, fail_once: Optional[str] = None):
    """``run_fit``, recording the attempt. ``stall``: that run's first attempt, once the
    checkpoint of epoch ``stall_epoch`` is on disk, writes its pid to ``marker`` and waits to be
    killed. ``fail_once``: that run's first attempt raises (a run's own error: a retry would
    succeed, so the test sees whether the executor retried it)."""
    from adapt.run import run_fit

    _record(log, recipe)
    name = str(recipe.run_name)
    first = sum(1 for e in attempts(log).get(name, [])) == 1
    if fail_once == name and first:
        raise ValueError(f"{name}: deliberate failure of the run itself")
    if stall == name and first and marker is not None:
        from adapt.checkpointing import RunCheckpoints

        original = RunCheckpoints.on_train_epoch_end

        def stalled(self, trainer, pl_module):
            original(self, trainer, pl_module)
            if self.saved_epoch == stall_epoch:  # its checkpoint is written (atomically)
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(str(os.getpid()))
                tmp.rename(marker)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:  # the test kills this process
                    time.sleep(0.05)
                raise RuntimeError("stalled run was not killed")

        RunCheckpoints.on_train_epoch_end = stalled
    return run_fit(recipe)
