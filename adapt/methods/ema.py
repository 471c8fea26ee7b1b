"""An exponential moving average of a method's trainable tensors, run as a teacher (MUST).

    θ̄ ← d_t · θ̄ + (1 − d_t) · θ,   d_t = d₀ + (d_∞ − d₀) · min(1, t / warm)

after every optimizer step t (0-based, counted over the run), from θ̄ = θ at the start: timm's
``ModelEma`` as MUST's ``ema.py`` and ``engine_self_training.py`` use it, with MUST's ramp of
the decay. The update is torch's own (``torch.optim.swa_utils.get_ema_multi_avg_fn``, a
foreach lerp); ``AveragedModel`` itself is not used because it deep-copies the whole module (here
the backbone with its unused text tower) and its first update copies instead of averaging.

The averages are persistent buffers of this module, so they reach ``trainable_state``, the
checkpoints and the adapter with the method's own tensors, and a resumed run continues from
them. The teacher runs the method's own forward with the averages in place of the live tensors
(``torch.func.functional_call``): no second copy of any module.

Departures from the original's ``ModelEma``: it averages only the trainable tensors (the frozen
ones are equal in teacher and student anyway) and never keeps a copy on another device.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def ramped_decay(step: int, start: float, end: float, warm_steps: int) -> float:
    """MUST's decay at step ``step``: linear from ``start`` to ``end`` over ``warm_steps`` steps,
    then ``end`` (``warm_steps`` 0: ``end`` throughout)."""
    if warm_steps <= 0:
        return float(end)
    return float(start + (end - start) * min(1.0, step / warm_steps))


def _key(name: str) -> str:
    # buffer names cannot hold dots; "/" never appears in a parameter's name
    return name.replace(".", "/")


class EmaTeacher(nn.Module):
    """The moving averages of ``named`` tensors (name under the method -> live tensor)."""

    def __init__(self, named: Mapping[str, torch.Tensor]):
        super().__init__()
        self.names = list(named)
        for name, tensor in named.items():
            self.register_buffer(_key(name), tensor.detach().clone())

    def averages(self) -> dict[str, torch.Tensor]:
        """name -> its average, keyed like the live tensors."""
        return {name: getattr(self, _key(name)) for name in self.names}

    @torch.no_grad()
    def update(self, live: Mapping[str, torch.Tensor], decay: float) -> None:
        """One EMA step of every average towards its live tensor at ``decay``."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"an EMA decay lies in [0, 1], got {decay}")
        averages = self.averages()
        ema = [averages[n] for n in self.names]
        current = [live[n].detach().to(averages[n].dtype) for n in self.names]
        get_ema_multi_avg_fn(decay)(ema, current, None)

    def run(self, module: nn.Module, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` with ``module``'s tensors replaced by their averages (``fn``
        is ``module``'s forward or anything that reads its tensors through it), without grad."""
        with torch.no_grad():
            return _call_with(module, self.averages(), fn, args, kwargs)


def _call_with(module: nn.Module, tensors: dict, fn: Callable, args, kwargs):
    """``fn`` run while ``module`` holds ``tensors`` in place of its own (functional_call of a
    wrapper whose forward is ``fn``)."""

    class _Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *a, **k):
            return fn(*a, **k)

    wrapped = {"inner." + n: t for n, t in tensors.items()}
    return torch.func.functional_call(_Call(), wrapped, args, kwargs, strict=False)
