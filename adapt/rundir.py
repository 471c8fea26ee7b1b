"""Run directories that are never lost: a new run never lands on an old one, a resume never
continues under another recipe, and ``overwrite=true`` moves the old run aside (never deletes it).

``status.json`` records where a run stands (``running``, ``interrupted``, ``diverged``,
``finished``) so that ``adapt export`` and users can tell a finished run from a stopped one.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from adapt.checkpointing import CHECKPOINT_NAME, read_checkpoint_recipe
from adapt.config import RecipeError
from adapt.io import atomic_write_json

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
# recipe keys that change how a run is driven or reported, never what it computes: a resume may
# change them freely (trainer.max_epochs is checked on its own: it may only grow)
RESUME_FREE_KEYS = ("resume", "overwrite", "baseline", "output_dir", "run_name", "logger.",
                    "trainer.progress_bar", "trainer.log_every_n_steps", "trainer.checkpoint_every_",
                    "trainer.check_val_every_n_epoch", "data.num_workers", "data.eval_batch_size",
                    "data.cache_dir", "trainer.devices", "trainer.accelerator", "trainer.strategy")


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def slurm_requeue_checkpoint(run_dir: Path) -> Optional[Path]:
    """A checkpoint Lightning's SLURM auto-requeue wrote (it resumes from it by itself)."""
    found = sorted(Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    return found[-1] if found else None


def prepare_run_dir(recipe: DictConfig, run_dir: Path) -> Optional[Path]:
    """Check ``run_dir`` before anything is trained; return the checkpoint to resume from (or None).

    - empty or new: a fresh run;
    - ``resume=true``: its ``last.ckpt`` (or a SLURM requeue checkpoint) must hold the same recipe
      (``trainer.max_epochs`` may grow, to train longer). Without a checkpoint, a new or empty
      folder, or a run of the same recipe killed before its first checkpoint, starts from scratch
      (so a cluster script may pass ``resume=true`` on every start); anything else is refused;
    - ``overwrite=true``: an existing run is renamed to ``<name>.replaced-<time>``;
    - otherwise a non-empty folder is refused with the choices.
    """
    run_dir = Path(run_dir)
    ckpt = checkpoint_path(run_dir)
    if recipe.resume:
        found = resumable_checkpoint(run_dir)
        if found is None:  # cluster scripts pass resume=true on every (re)start: see below
            _check_fresh_start(recipe, run_dir)
            return None
        check_resume(read_checkpoint_recipe(found) or _saved_recipe(run_dir), recipe, found)
        return found
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if slurm_requeue_checkpoint(run_dir) is not None:
        log.info("%s: resuming from Lightning's SLURM requeue checkpoint", run_dir)
        return None  # Lightning picks the hpc checkpoint itself
    if recipe.overwrite:
        base = f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, n = run_dir.with_name(base), 1
        while aside.exists():
            aside, n = run_dir.with_name(f"{base}-{n}"), n + 1
        run_dir.rename(aside)
        log.warning("overwrite=true: the previous run in %s was moved to %s", run_dir, aside)
        print(f"overwrite=true: the previous run was moved to {aside}")
        return None
    state = read_status(run_dir).get("state")
    if (run_dir / RESULTS_FILE).is_file():
        what = "a finished run"
    elif ckpt.is_file():
        what = f"an unfinished run ({state or 'stopped'}) with a checkpoint"
    else:
        what = "files from another run"
    raise RecipeError(
        f"{run_dir} already holds {what}. Add resume=true to continue it, overwrite=true to start "
        "again (the old run is moved aside, never deleted), or choose another run_name / output_dir.")


def resumable_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``resume=true`` continues from: ``last.ckpt``, else a SLURM requeue one."""
    ckpt = checkpoint_path(run_dir)
    return ckpt if ckpt.is_file() else slurm_requeue_checkpoint(run_dir)


def _check_fresh_start(recipe: DictConfig, run_dir: Path) -> None:
    """``resume=true`` and no checkpoint: start from scratch when nothing can be lost by it.

    Safe: no folder, an empty one, or one where adapt started this very recipe (its
    ``recipe.yaml``) and finished nothing (no results). The new attempt writes the same files
    again; nothing is deleted here.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        print(f"resume=true: {run_dir} holds no run yet; starting it from scratch")
        return
    saved = run_dir / "recipe.yaml"
    if (run_dir / RESULTS_FILE).is_file():
        raise RecipeError(
            f"resume=true but {run_dir} holds a finished run and no checkpoint to continue "
            f"({checkpoint_path(run_dir)} is missing). Use overwrite=true to train it again (the old "
            "run is moved aside, never deleted), or choose another run_name / output_dir")
    if not saved.is_file():
        raise RecipeError(
            f"resume=true but {run_dir} holds files that are not an adapt run's (no recipe.yaml, no "
            "checkpoint). Choose another run_name / output_dir, or add overwrite=true to move them aside")
    check_resume(_saved_recipe(run_dir), recipe, saved)
    state = read_status(run_dir).get("state", "stopped")
    print(f"resume=true: the run in {run_dir} ({state}) stopped before its first checkpoint; "
          "starting it again from scratch with the same recipe")
    log.info("%s: no checkpoint to resume, same recipe: starting from scratch", run_dir)


def check_resume(saved: Optional[dict], recipe: DictConfig, ckpt: Path) -> None:
    """Refuse a resume whose recipe differs from the one saved in ``ckpt`` (a checkpoint or the
    run's ``recipe.yaml``), listing the keys."""
    if saved is None:
        raise RecipeError(f"{ckpt} holds no recipe (written by an older adapt?); cannot check that "
                          "resuming it is safe. Start again with overwrite=true")
    new = OmegaConf.to_container(recipe, resolve=True)
    old_flat, new_flat = _flatten(saved), _flatten(new)
    old_epochs = old_flat.get("trainer.max_epochs")
    new_epochs = new_flat.get("trainer.max_epochs")
    if old_epochs is not None and new_epochs is not None and new_epochs < old_epochs:
        raise RecipeError(
            f"trainer.max_epochs={new_epochs} is lower than the {old_epochs} epochs the checkpoint "
            f"{ckpt} was trained towards; a run can be resumed to train longer, not shorter. Use "
            "overwrite=true (or another run_name) for a shorter run")
    differ = sorted(k for k in set(old_flat) | set(new_flat)
                    if k != "trainer.max_epochs" and not k.startswith(RESUME_FREE_KEYS)
                    and old_flat.get(k, "<absent>") != new_flat.get(k, "<absent>"))
    if differ:
        lines = ", ".join(f"{k}: {old_flat.get(k, '<absent>')!r} -> {new_flat.get(k, '<absent>')!r}"
                          for k in differ[:12])
        more = f" (and {len(differ) - 12} more)" if len(differ) > 12 else ""
        raise RecipeError(
            f"resume=true with a recipe that differs from the one saved in {ckpt}: {lines}{more}. "
            "Resume with the original recipe (only trainer.max_epochs may grow), or start a new run "
            "with overwrite=true or another run_name")


def _saved_recipe(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / "recipe.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, state: str, **extra) -> None:
    atomic_write_json(Path(run_dir) / STATUS_FILE, {"state": state, "time": time.time(), **extra})
