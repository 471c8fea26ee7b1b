"""SubPT (Ma et al., TCSVT 2023): CoOp whose updates stay in the subspace its early training spanned.

Two runs, chained with ``init_from`` (as the original chains two trainings):

1. ``stage: trajectory`` — CoOp, unchanged, recording its context after each of the first
   ``trajectory_epochs`` epochs (t_early) in the adapter (the buffer ``trajectory``), where the
   original saves a checkpoint every epoch (``TRAIN.CHECKPOINT_FREQ 1``). The record is method
   state: checkpoints and resume keep it.
2. ``stage: subspace`` — CoOp again, every step's gradient g (all contexts, flattened) replaced
   by Uᵀ(U g): U [r, M·D] are the top r principal directions of the recorded contexts (PCA:
   mean-centred, the SVD's right singular vectors; ``compute_eigenvector.py`` uses sklearn's
   ``PCA(svd_solver="full")``, whose projector UᵀU is the same). It runs in the engine's gradient
   hook, so on the averaged gradient under DDP. Prediction is CoOp's.

Reference: machengcheng2016/Subspace-Prompt-Learning at d546764 (``CoOp/trainers/coop_sub.py``,
``Dassl.pytorch/dassl/engine/trainer.py::model_subspace_backward_and_update``,
``CoOp/compute_eigenvector.py``, ``CoOp/scripts/coop_sub.sh``): N_CTX 16, random init, CoOp's
optimisation; (t_early, r) by shots 1 → (10, 5), 2 → (20, 10), 4 → (30, 10), 8 → (40, 10),
16 → (50, 10); base-to-novel at 4 shots, 100 epochs, (30, 10).

Decisions and departures:
- Where stage 2 starts: the released scripts pass the trajectory's epoch-1 checkpoint as
  ``DIRECT_RESUME``, which ``train.py`` declares and never reads, so the retraining starts from
  the seed's fresh initialisation, i.e. where the trajectory run started when the seeds agree.
  ``restart: seed`` (default) does that; ``restart: first_epoch`` starts from the recorded
  epoch-1 context (what the scripts meant).
- The projection runs in fp32 (the original casts U to CLIP's fp16 and projects in it).
- Weight decay acts after the projection, outside the subspace, as in the original (SGD adds
  it inside ``step``).
- The Novel Feature Learner (``coop_nfl.py``) is not included: its base-to-novel name list is
  the dataset's novel classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from adapt.methods.adapters import adapter_folder, read_adapter_meta, read_adapter_state
from adapt.methods.coop import CoOp, CoOpConfig
from adapt.methods.registry import register_method

STAGES = ("trajectory", "subspace")


@dataclass
class SubPTConfig(CoOpConfig):
    stage: str = "trajectory"
    trajectory_epochs: int = 50  # t_early: the epochs recorded in stage 1 (16 shots)
    rank: int = 10               # r: the subspace's dimension (stage 2)
    init_from: Optional[str] = None  # stage 2: the stage-1 run (its run directory or adapter)
    restart: str = "seed"        # seed | first_epoch: where stage 2's context starts
    DEFAULT_N_CTX: ClassVar[int] = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.restart not in ("seed", "first_epoch"):
            raise ValueError(f"restart must be 'seed' or 'first_epoch', got {self.restart!r}")
        if self.trajectory_epochs < 2 or self.rank < 1:
            raise ValueError(f"trajectory_epochs must be >= 2 and rank >= 1, got {self.trajectory_epochs} "
                             f"and {self.rank}")
        if self.init_from and self.stage != "subspace":
            raise ValueError("method.init_from starts stage subspace from a trajectory run; set "
                             "method.stage=subspace (or drop init_from)")
        if self.csc:
            raise ValueError("subpt projects one shared context (method.csc=false), as the original")


@register_method("subpt")
class SubPT(CoOp):
    Config = SubPTConfig
    trainable_kind = "text context"

    def __init__(self, config: SubPTConfig, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        size = self.prompts.ctx.numel()
        if config.stage == "trajectory":
            self.register_buffer("trajectory", torch.zeros(config.trajectory_epochs, size))
            self.register_buffer("recorded", torch.zeros((), dtype=torch.long))
        else:
            self.register_buffer("basis", torch.zeros(config.rank, size))
            if config.init_from:
                self._start_from(config.init_from)

    def _start_from(self, path: str) -> None:
        """U from the stage-1 record; the context from the seed's init or the record's epoch 1."""
        adapter = adapter_folder(path)
        meta = read_adapter_meta(adapter)
        if meta["method"] != "subpt" or meta["method_config"].get("stage") != "trajectory":
            raise ValueError(f"method.init_from={path} is not a subpt adapter of stage trajectory "
                             "(recipes/subpt/trajectory.yaml makes one)")
        state = read_adapter_state(adapter, meta)
        record = state["trajectory"][: int(state["recorded"])]
        if record.shape[1] != self.prompts.ctx.numel():
            raise ValueError(f"method.init_from={path}: its contexts have {record.shape[1]} values, this "
                             f"subpt's {self.prompts.ctx.numel()} (the same n_ctx on the same backbone?)")
        if record.shape[0] <= self.config.rank:
            raise ValueError(f"method.init_from={path} recorded {record.shape[0]} epochs, which span at most "
                             f"{record.shape[0] - 1} directions after centring; method.rank={self.config.rank} "
                             "needs more: train stage 1 longer or lower the rank")
        with torch.no_grad():
            self.basis.copy_(principal_directions(record, self.config.rank))
            if self.config.restart == "first_epoch":
                self.prompts.ctx.copy_(record[0].view_as(self.prompts.ctx))

    def setup(self, datamodule) -> None:
        if self.config.stage == "subspace" and not self.basis.any():
            raise ValueError("subpt stage subspace projects onto the directions of a trajectory run, and "
                             "none was given: set method.init_from=<the run of recipes/subpt/trajectory.yaml>")

    def on_train_epoch_end(self, epoch: int, max_epochs: int) -> None:
        if self.config.stage == "trajectory" and epoch < self.trajectory.shape[0]:
            with torch.no_grad():
                self.trajectory[epoch].copy_(self.prompts.ctx.detach().flatten())
                self.recorded.fill_(epoch + 1)

    def transform_gradients(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.config.stage != "subspace" or self.prompts.ctx.grad is None:
            return
        grad = self.prompts.ctx.grad
        u = self.basis.to(torch.float32)
        grad.copy_((u.t() @ (u @ grad.flatten().float())).view_as(grad))


def principal_directions(points: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` principal axes [rank, D] of ``points`` [T, D] (mean-centred, orthonormal rows)."""
    centred = points.double() - points.double().mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:rank].float()
