"""BatchNorm recalibration: new running statistics for weights whose statistics are stale.

An average of checkpoints (:func:`vafunc.tree.average`: stochastic weight averaging, model soups),
a point between two networks (:func:`vafunc.tree.interpolate`) or an edited network has weights
that its stored BatchNorm statistics do not describe; :func:`recalibrate_batch_norm` recomputes
them from data, as ``torch.optim.swa_utils.update_bn`` does for a module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vafunc.core import random as vrandom
from vafunc.core import tree as vtree
from vafunc.core.backends import Plain

__all__ = ["recalibrate_batch_norm"]


class _Cumulative(Plain):
    """The backend of a recalibration pass: train-mode BatchNorm with the factor ``1 / k`` at the
    ``k``-th batch (torch's ``momentum=None``: a cumulative average, by torch's own kernel);
    dropout and stochastic depth off unless the pass is keyed."""

    def __init__(self, k: int, keyed: bool):
        self.k, self.keyed = k, keyed

    def batch_norm(self, x, p, s, *, train, momentum, eps):
        return super().batch_norm(x, p, s, train=train, momentum=1.0 / self.k, eps=eps)

    def dropout(self, x, rate, rng, train):
        return super().dropout(x, rate, rng, train) if self.keyed else x

    def drop_path(self, x, rate, rng, train):
        return super().drop_path(x, rate, rng, train) if self.keyed else x


_RESET = {"running_mean": torch.zeros_like, "running_var": torch.ones_like, "num_batches_tracked": torch.zeros_like}


def _reset(state: dict) -> dict:
    """BatchNorm buffers as ``reset_running_stats`` leaves them (mean 0, variance 1, count 0)."""
    flat = vtree.flatten(state)
    return vtree.unflatten({k: _RESET.get(k.rpartition(".")[2], lambda t: t)(v) for k, v in flat.items()})


def recalibrate_batch_norm(model, params: dict, state: dict, batches: Iterable, *, rng=None, **kw) -> dict:
    """The BatchNorm state of ``params`` recomputed from ``batches`` (an iterable of image batches
    ``[B, C, H, W]``, or of tuples/lists whose first item is one, such as ``(x, y)`` from a loader).

    Equal to ``torch.optim.swa_utils.update_bn`` on the reference module with the same weights:
    each running statistic is reset, then becomes the cumulative average over the batches of the
    batch means and unbiased batch variances (BatchNorm's ``momentum=None``, computed by torch's
    own kernel); ``num_batches_tracked`` is the number of batches. Nothing is mutated: the new
    state is returned, and other state leaves (index tables) are kept.

    A stacked ensemble (every leaf with a leading member axis, :func:`vafunc.stack`) gets each
    member's own statistics; its batches are shared by all members ``[B, C, H, W]`` or one per
    member ``[N, B, C, H, W]``. Dropout and stochastic depth are off during the pass (the
    statistics are for the eval network); ``update_bn`` runs the module in train mode, with them
    on, which changes a BatchNorm behind a random layer: pass ``rng`` (a key, folded per batch and
    member) to do the same. ``policy=`` passes through to ``model.apply``. A model without
    BatchNorm gets ``state`` back."""
    if not any(k.endswith("running_mean") for k in vtree.flatten(state)):
        return state
    meta = vtree.flatten(model.init(device="meta")[0])
    flat = vtree.flatten(params)
    if list(flat) != list(meta):
        raise ValueError(f"{model.name}: params are not this model's tree (first names: {list(flat)[:3]})")
    k0 = next(iter(meta))
    ensemble = flat[k0].dim() == meta[k0].dim() + 1
    members = list(zip(vtree.unstack(params), vtree.unstack(state))) if ensemble else [(params, state)]
    new = [_reset(s) for _, s in members]
    count = 0
    with torch.no_grad():
        for count, batch in enumerate(batches, 1):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batches must yield image tensors or (x, ...) tuples, got {type(x).__name__}")
            per_member = ensemble and x.dim() == 5
            if per_member and x.shape[0] != len(members):
                raise ValueError(f"per-member batches need {len(members)} on axis 0, got shape {list(x.shape)}")
            low = _Cumulative(count, rng is not None)
            for i, (p, _) in enumerate(members):
                key = None if rng is None else vrandom.fold_in(vrandom.fold_in(rng, count), i)
                _, new[i] = model.apply(p, new[i], x[i] if per_member else x, train=True, rng=key, backend=low, **kw)
    if not count:
        raise ValueError("recalibrate_batch_norm needs at least one batch, got none")
    return vtree.stack(new) if ensemble else new[0]
