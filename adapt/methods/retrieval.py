"""A retrieval index over the few-shot training images: what a method queries per image.
(A shared piece, not a port of any original: departures none.)

The index holds, for every training image of the method's classes, its frozen, L2-normalized
CLIP image feature (the key) and its label (the value). It is built once, in ``setup``, through
the data module's ``encode`` (so the features come from, and go to, the feature cache like
every other frozen encoding: a second run, seed or hyper-parameter pays nothing), and its keys
and labels are persistent buffers: an exported adapter carries its index and predicts without
the training data. Nothing in a forward pass re-encodes the training set.

Search is exact (cosine similarity = dot product of normalized features, ``topk``): the
few-shot sets it is built for hold at most tens of thousands of images.

Leave-one-out: a training query is a view of an image that is itself in the index, so its own
entry would be its nearest neighbour and its label would leak into the vote. ``search(...,
exclude_nearest=True)`` drops every query's single most similar entry; methods pass it while
training (see ``RePrompt``). An augmented view is not bit-identical to its key, so the entry
dropped is "the nearest" rather than "the same file"; batches carry no item ids to do better.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.data.items import Item
from adapt.methods.base import items_of_every_class


class FeatureIndex(nn.Module):
    """Keys [N, d] (normalized frozen image features) and labels [N], as persistent buffers."""

    def __init__(self, dim: int, device=None, dtype=torch.float32):
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, dim, device=device, dtype=dtype))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def set(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        if keys.dim() != 2 or labels.shape != keys.shape[:1]:
            raise ValueError(f"index keys must be [N, d] with N labels, got {tuple(keys.shape)} "
                             f"and {tuple(labels.shape)}")
        self.keys = F.normalize(keys.to(self.keys.device, self.keys.dtype), dim=-1)
        self.labels = labels.to(self.labels.device, torch.long)

    def resize_like(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Empty buffers of a saved index's shapes, for ``load_state_dict`` to fill."""
        self.keys = torch.zeros(keys.shape, device=self.keys.device, dtype=self.keys.dtype)
        self.labels = torch.zeros(labels.shape, device=self.labels.device, dtype=torch.long)

    def search(self, queries: torch.Tensor, k: int, exclude_nearest: bool = False):
        """The ``k`` most similar entries of each normalized query [B, d]: similarities [B, k]
        (descending) and entry indices [B, k]. ``exclude_nearest`` drops each query's single
        nearest entry first (leave-one-out for queries drawn from the indexed images). ``k`` is
        capped at what the index holds."""
        if len(self) == 0:
            raise RuntimeError("the retrieval index is empty: call setup(datamodule) with the "
                               "training data, or load an exported adapter")
        available = len(self) - int(exclude_nearest)
        if available < 1:
            raise ValueError("leave-one-out retrieval needs at least 2 indexed images")
        k = max(1, min(int(k), available))
        sims = queries @ self.keys.to(queries.dtype).t()
        top, idx = sims.topk(k + int(exclude_nearest), dim=-1)
        if exclude_nearest:
            top, idx = top[:, 1:], idx[:, 1:]
        return top, idx

    def neighbour_weights(self, sims: torch.Tensor, temperature: float) -> torch.Tensor:
        """softmax(sim / τ) over each query's retrieved neighbours [B, k]."""
        return torch.softmax(sims.float() / temperature, dim=-1)

    def vote(self, weights: torch.Tensor, idx: torch.Tensor, n_classes: int) -> torch.Tensor:
        """The kNN class distribution [B, C]: each neighbour's weight added to its label."""
        out = torch.zeros(weights.shape[0], n_classes, device=weights.device, dtype=weights.dtype)
        return out.scatter_add_(1, self.labels[idx], weights)

    def mix(self, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The weighted mean of each query's neighbours' keys [B, d] (labels not read)."""
        return torch.einsum("bk,bkd->bd", weights.to(self.keys.dtype), self.keys[idx])


def training_items(method, datamodule, name: str) -> list[Item]:
    """The training items of ``method``'s classes, relabelled to its class order by name. Every
    class needs at least one image (else nothing could ever be retrieved for it)."""
    return items_of_every_class(datamodule.train_items, datamodule.train_classnames, method.classnames,
                                f"{name} builds its retrieval index from the training images of every class")


def encode_index(method, datamodule, items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen, normalized features [N, d] and labels [N] of ``items`` under the test transform,
    through the data module's feature cache (encoded once across runs)."""
    views = datamodule.encode(method.backbone, items, datamodule.test_transform(), "train", views=1,
                              normalize=False)
    return F.normalize(views.features[0].float(), dim=-1), views.labels


def signature_of(items: Sequence[Item]) -> tuple:
    """What identifies an index's contents: the (path, label) of every item, in order."""
    return tuple((str(it.path), int(it.label)) for it in items)
