"""Checkpoints that make an interrupted run cost nothing.

- ``last.ckpt`` is written at epoch ends: every ``trainer.checkpoint_every_n_epochs`` epochs
  (default: four times per run), at the first epoch end after ``checkpoint_every_minutes`` of
  wall time, and after the last epoch. Only epoch ends: Lightning cannot resume a plain
  DataLoader mid-epoch exactly, and an epoch-end checkpoint resumes bit for bit.
- Every checkpoint carries the resolved recipe (a resume compares it with the new one) and the
  RNG states of python, numpy and torch at that epoch end, so the resumed run draws the same
  shuffles and augmentations as the uninterrupted one.
- Ctrl-C and SIGTERM (cluster pre-emption) write the state of the last finished epoch (kept in
  memory at every epoch end while that is small) and stop with ``RunInterrupted``; the runner
  prints the resume command. Under SLURM, Lightning's own auto-requeue (SIGUSR1) stays in charge.
- Files go through ``AtomicCheckpointIO``: a kill while writing leaves the previous file intact.
- Every checkpoint is read weights-only (tensors and plain values): a file carrying a pickle
  payload is refused with one message (``refuse_pickles``), never run. That covers adapt's own
  reads, every trainer restore (``fit(ckpt_path=...)``, SLURM's ``hpc_ckpt_*.ckpt`` after a
  requeue: Lightning reads both through ``AtomicCheckpointIO``) and
  ``AdaptModule.load_from_checkpoint``.
"""
from __future__ import annotations

import logging
import math
import pickle
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from adapt.io import atomic_save

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.ckpt"
STATE_KEY = "adapt"  # our entry in a checkpoint dict: the recipe and the RNG states
# the last finished epoch is kept in memory for Ctrl-C / SIGTERM below this many elements
SNAPSHOT_MAX_ELEMENTS = 64 * 2 ** 20


class RunInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped training; a checkpoint was written (or the message says why not)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class CheckpointError(ValueError):
    """A checkpoint adapt will not load."""


@contextmanager
def refuse_pickles(path) -> Iterator[None]:
    """Turn torch's weights-only refusal of a pickle payload into one message naming ``path``.

    Only that refusal: other errors inside the block (a damaged file, a module that fails to
    build) keep their own messages."""
    try:
        yield
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values (a pickle payload); adapt "
            "loads checkpoints weights-only and will not run it. If you wrote this file yourself "
            "with an older adapt or another tool and trust it, train the run again with "
            "overwrite=true (the old run is moved aside, not deleted); otherwise delete the file "
            "and do not use it") from None


def weights_only_flag(requested: Optional[bool]) -> bool:
    """``None`` (nothing asked) means weights-only on every torch adapt supports; torch < 2.6
    would otherwise unpickle. Only an explicit ``False`` from the caller loads pickles."""
    return True if requested is None else bool(requested)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, then rename: never a torn checkpoint. Reads are
    weights-only (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict:
        with refuse_pickles(path):
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only_flag(weights_only))


def auto_every_n_epochs(max_epochs: int, every: Optional[int]) -> int:
    """Explicit value, else a few checkpoints per run (four)."""
    if every:
        return int(every)
    return max(1, math.ceil(max_epochs / 4))


def read_checkpoint_recipe(path: Path) -> Optional[dict]:
    """The recipe stored in one of our checkpoints (weights-only load: nothing is unpickled)."""
    try:
        with refuse_pickles(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}. It is damaged; start the run "
                         "again with overwrite=true (the old run is moved aside, not deleted)") from None
    entry = ckpt.get(STATE_KEY) if isinstance(ckpt, dict) else None
    return entry.get("recipe") if isinstance(entry, dict) else None


def rng_states() -> dict:
    """python, numpy and torch (CPU) generator states as tensors and plain values, so that a
    weights-only load can read the checkpoint (numpy's own state holds an ndarray)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _detached_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached_copy(v) for v in obj)
    return obj


def _elements(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_elements(v) for v in obj)
    return 0


class RunCheckpoints(Checkpoint):
    """Epoch-end ``last.ckpt`` (see the module docstring), recipe + RNG states, interruptions.

    A ``Checkpoint`` subclass so that Lightning calls it after the LightningModule's own epoch-end
    hook (a method's epoch-end update, e.g. PromptSRC's averaging, is in the saved state) and adds
    no checkpoint callback of its own."""

    def __init__(self, ckpt_dir: Path, recipe: dict, max_epochs: int, every_n_epochs: Optional[int] = None,
                 every_minutes: Optional[float] = 10.0):
        self.path = Path(ckpt_dir) / CHECKPOINT_NAME
        self.recipe = recipe
        self.every_n = auto_every_n_epochs(max_epochs, every_n_epochs)
        self.every_s = float(every_minutes) * 60 if every_minutes else math.inf
        self._last_save = time.monotonic()
        self._snapshot: Optional[dict] = None
        self.saved_epoch: Optional[int] = None  # epochs finished in the last written checkpoint
        self.interrupted: Optional[RunInterrupted] = None

    # ----------------------------------------------------------------- what a checkpoint holds
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[STATE_KEY] = {"recipe": self.recipe, "rng": rng_states()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        entry = checkpoint.get(STATE_KEY) or {}
        if "rng" in entry:
            set_rng_states(entry["rng"])

    # ----------------------------------------------------------------- when it is written
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        done = trainer.current_epoch + 1
        due = (done % self.every_n == 0 or done >= trainer.max_epochs
               or time.monotonic() - self._last_save >= self.every_s)
        if due:
            trainer.save_checkpoint(self.path)
            self._last_save, self.saved_epoch, self._snapshot = time.monotonic(), done, None
        else:
            self._keep_snapshot(trainer, done)

    def _keep_snapshot(self, trainer, done: int) -> None:
        # the state of this finished epoch, for Ctrl-C / SIGTERM during the next one
        ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if _elements(ckpt) > SNAPSHOT_MAX_ELEMENTS:
            self._snapshot = None
            return
        self._snapshot = {"epoch": done, "checkpoint": _detached_copy(ckpt)}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            name, code = "Ctrl-C", 130
        elif isinstance(exception, SIGTERMException):
            name, code = "SIGTERM", 143
        else:
            return
        epoch = self.saved_epoch
        if self._snapshot is not None:
            if rank_zero_only.rank == 0:
                trainer.strategy.checkpoint_io.save_checkpoint(self._snapshot["checkpoint"], self.path)
            epoch = self._snapshot["epoch"]
        if epoch is None:
            where = "before the first epoch finished: no checkpoint to resume from"
        else:
            where = f"checkpoint after epoch {epoch}: {self.path}"
        self.interrupted = RunInterrupted(f"{name}: training stopped ({where})", code)
