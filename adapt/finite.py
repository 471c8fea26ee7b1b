"""Non-finite values: the error a diverged run ends with, and the check that no checkpoint or
adapter holding nan / inf is ever written (used by the engine and by export)."""
from __future__ import annotations

import torch

__all__ = ["TrainingDiverged", "check_finite_state"]


class TrainingDiverged(RuntimeError):
    """The loss or the trained state became non-finite (nan / inf)."""


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to save a state holding nan / inf: a checkpoint or adapter of a diverged run."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingDiverged(f"the trained state has non-finite values ({', '.join(bad[:5])}); "
                               f"no {what} with nan / inf is written")
