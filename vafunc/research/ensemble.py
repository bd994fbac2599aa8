"""Ensembles and per-sample gradients: many models, or many samples, in one call.

An ensemble is N ``(params, state)`` trees stacked on a new leading axis (:func:`vafunc.stack`).
:func:`ensemble_apply` evaluates all members, in eval or train mode, each with its own BatchNorm
statistics and its own dropout / stochastic-depth key. Lowerings (``method=``; one name, one
default here and in ``make_train_step(ensemble_method=)``):

* ``"auto"`` (the default): ``"batched"`` where the family has a members-mode lowering and the
  member's batch is small (research scale: ``B * H * W <= 2**14`` pixels), else ``"loop"``: the
  faster of the two as measured on CPUs (see benchmarks/README.md for the figures).
* ``"batched"``: members mode (:mod:`vafunc.research.members`), all members in one forward pass, each
  parameterised layer lowered by its shape (batched matrix products on small maps, grouped
  convolutions on medium ones, each member's own convolution on large ones).
* ``"loop"``: a Python loop over the members on views of the stacked tensors.
* ``"vmap"``: ``torch.vmap`` over ``model.apply``; the lowering to use inside ``torch.func``
  transforms (``vmap(grad(...))``). On CPUs torch's batching rule turns every member-batched
  convolution into an NCHW grouped convolution, the slowest lowering measured.

For compiled inference with fixed weights, ``torch_compat.compile_ensemble`` puts all members in one
graph with the weights frozen into it as constants (members mode on small stacked batches, the
members as modules above; see its docstring).
"""

from __future__ import annotations

import torch

from vafunc.core import random as vrandom
from vafunc.core import tree as vtree
from vafunc.research.members import Members
from vafunc.research.members import covers as members_covers
from vafunc.research.members import prefer as members_prefer

__all__ = ["ensemble_init", "ensemble_apply", "ensemble_size", "member_keys"]


def ensemble_init(model, n: int, key=0, *, device=None, dtype=None) -> tuple[dict, dict]:
    """``n`` independently initialised members, stacked: leaves get a leading axis of size ``n``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"ensemble size must be a positive int, got {n!r}")
    keys = vrandom.split(vrandom.as_key(key), n)
    members = [model.init(k, device=device, dtype=dtype) for k in keys]
    return vtree.stack([p for p, _ in members]), vtree.stack([s for _, s in members])


def ensemble_size(params) -> int:
    leaves = vtree.tree_leaves(params)
    if not leaves:
        raise ValueError("empty parameter tree")
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"not a stacked ensemble: leading axes {sorted(sizes)} (use vafunc.stack)")
    return sizes.pop()


def member_keys(rng, n: int):
    """``None``, one key (split into ``n``) or ``n`` keys ``[n, 2]`` -> ``n`` keys or ``None``."""
    if rng is None:
        return None
    if not vrandom.is_key(rng):
        raise TypeError(f"rng must be a vafunc.core.random key [2] or a batch of keys [N, 2], got {rng!r}")
    if rng.dim() == 1:
        return vrandom.split(rng, n)
    if rng.shape != (n, 2):
        raise ValueError(f"expected {n} member keys [{n}, 2], got shape {list(rng.shape)}")
    return rng


def _member_inputs(x: torch.Tensor, n: int) -> tuple[torch.Tensor, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image batch tensor, got {type(x).__name__}")
    if x.dim() == 4:
        return x, False
    if x.dim() == 5:
        if x.shape[0] != n:
            raise ValueError(f"per-member inputs must have {n} on axis 0 (one batch per member), got {list(x.shape)}")
        return x, True
    raise ValueError(
        f"ensemble input must be one batch [B, C, H, W] shared by all members or one per member "
        f"[N, B, C, H, W], got shape {list(x.shape)}"
    )


def map_outputs(fn, y):
    """``fn`` over a model's output: the logits tensor, or each tensor of a segmentation model's
    dict (``{"out", "aux"}``)."""
    return {k: fn(v) for k, v in y.items()} if isinstance(y, dict) else fn(y)


def stack_outputs(outs: list):
    """The members' outputs stacked on a new axis 0 (each entry of dict outputs)."""
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return torch.stack(outs)


def ensemble_apply(model, params, state, x, *, train: bool = False, rng=None, method: str = "auto", **kw):
    """All members on ``x``: ``-> (logits [N, B, classes], new_state)`` (state stacked like the input).

    ``x`` is ``[B, C, H, W]`` (shared) or ``[N, B, C, H, W]`` (one batch per member); ``rng`` is one key
    (split per member) or ``N`` keys. Equal to a Python loop of ``model.apply`` over the members.
    ``method``: ``"auto"`` (default: ``"batched"`` for a covered family on a small stacked batch,
    else ``"loop"``; :func:`vafunc.research.members.prefer`), ``"batched"``, ``"loop"`` or ``"vmap"``.
    Other keywords (``policy=``, ``attention=``) pass through to ``model.apply``.
    """
    n = ensemble_size(params)
    x, per_member = _member_inputs(x, n)
    keys = member_keys(rng, n)
    if method == "vmap":
        in_dims = (0, 0, 0 if per_member else None, None if keys is None else 0)

        def one(p, s, xi, k):
            return model.apply(p, s, xi, train=train, rng=k, **kw)

        logits, new_state = torch.vmap(one, in_dims=in_dims, randomness="error")(params, state, x, keys)
        return logits, (new_state if train else state)
    if method == "auto":
        method = "batched" if members_prefer(model, n, x) else "loop"
    if method == "batched":
        if not members_covers(model):
            raise ValueError(f"{model.name} has no members-mode lowering (bare parameters); use method='loop'")
        xb = x.reshape(n * x.shape[1], *x.shape[2:]) if per_member else x
        logits, new_state = model.apply(
            params, state, xb, train=train, rng=keys, backend=Members(n, shared_input=not per_member), **kw
        )
        return map_outputs(lambda t: t.view(n, -1, *t.shape[1:]), logits), (new_state if train else state)
    if method != "loop":
        raise ValueError(f"method must be 'auto', 'batched', 'loop' or 'vmap', got {method!r}")
    outs, states = [], []
    member_params, member_state = vtree.unstack(params), vtree.unstack(state) or [state] * n
    for i, (p, s) in enumerate(zip(member_params, member_state)):
        out, ns = model.apply(p, s, x[i] if per_member else x, train=train, rng=None if keys is None else keys[i], **kw)
        outs.append(out)
        states.append(ns)
    logits = stack_outputs(outs)
    return logits, (vtree.stack(states) if train else state)
