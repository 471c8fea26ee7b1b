"""Label-prior matching, shared by the methods that learn from unlabelled data: the divergence
between a prior over the classes and the model's mean prediction, and the estimator of that
mean over a window of batches.

    KL(π ‖ p̄) = Σ_c π_c log(π_c / p̄_c),   p̄ = mean over a window of batch means of softmax(logits)

CLIPPR (Kahana et al., 2022) weighs it by α beside its CE on zero-shot pseudo-labels, with π the
user's prior; MUST's fairness term is the same KL with π uniform (−mean log p̄ = KL(U ‖ p̄) +
log C). The prior itself is data (``data.unlabelled.prior``, checked in adapt/data/priors.py).

Departures from CLIPPR's ``model.py`` (its values and gradients elsewhere equal, tests/test_clippr.py):
classes with π_c = 0 add nothing (0 · log 0 = 0), where its ``KLD_Loss`` (``target *
log(target / pred)``) gives NaN, so a prior that rules a class out could not be used; the FIFO
of batch means is not checkpointed (a resumed run restarts it uniform).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F


def prior_kl(prior: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """KL(``prior`` ‖ ``mean_probs``) of two distributions over the classes [C] (a scalar)."""
    prior = prior.to(mean_probs.dtype)
    return (torch.special.xlogy(prior, prior) - torch.special.xlogy(prior, mean_probs)).sum()


def batch_mean_probs(logits: torch.Tensor) -> torch.Tensor:
    """The batch's mean predicted distribution [C], in float32 whatever the autocast dtype (the
    log of a small share in bf16 would be coarse)."""
    return F.softmax(logits.float(), dim=-1).mean(dim=0)


class BatchMeanWindow:
    """p̄ over the last ``size`` batches: a FIFO of batch means, the newest with its graph, the
    others detached (so each step's gradient reaches only its own batch), started as ``size``
    uniform entries (CLIPPR's ``acc_batches_over_time``; ImageNet: 300). ``size`` 1 is the batch's
    own mean. The window is not saved with checkpoints: a resumed run restarts it uniform, as
    the original starts every run."""

    def __init__(self, size: int, num_classes: int):
        if size < 1:
            raise ValueError(f"the window holds at least one batch, got {size}")
        self.size, self.num_classes = int(size), int(num_classes)
        self.reset()

    def reset(self) -> None:
        self.entries: list[torch.Tensor] = [torch.full((self.num_classes,), 1.0 / self.num_classes)] * self.size

    def push(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """Enter the current batch's mean (oldest out); returns the window's mean, with the
        gradient of the current entry only."""
        older = [e.to(batch_mean.device, batch_mean.dtype) for e in self.entries[1:]]
        estimate = torch.stack(older + [batch_mean]).mean(dim=0)
        self.entries = older + [batch_mean.detach()]
        return estimate


def as_prior(shares: Union[Sequence[float], torch.Tensor], num_classes: int) -> torch.Tensor:
    """A prior [C] as float32 (its shares were checked where they were read)."""
    prior = torch.as_tensor(shares, dtype=torch.float32)
    if prior.shape != (num_classes,):
        raise ValueError(f"the prior has {tuple(prior.shape)} shares for {num_classes} classes")
    return prior
