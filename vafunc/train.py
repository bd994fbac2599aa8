"""A functional train step: ``(params, state, opt_state, batch, rng) -> (params, state, opt_state, metrics)``.

Built from ``model.apply(..., train=True)`` and a :mod:`vafunc.optim` optimizer; nothing is mutated.
``make_train_step(model, opt)`` trains one model; ``make_train_step(model, opt, ensemble=True)``
trains a stacked ensemble in one call (``torch.vmap`` over the members' gradients, each member its
own BatchNorm statistics and dropout keys; the optimizer update is element-wise, so it runs on the
stacked trees directly).

Gradients (``grad=``): ``"autograd"`` (default for one model) differentiates with
``torch.autograd.grad`` on fresh leaf views of the parameters, the same engine path as
``loss.backward()`` with no functorch wrapping; ``"func"`` uses ``torch.func.grad`` (needed inside
other ``torch.func`` transforms and the default for ensembles). Both are pure and give the same numbers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import tree as vtree
from .ensemble import member_keys, ensemble_size

__all__ = ["make_train_step", "cross_entropy", "accuracy"]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean()


def make_train_step(model, optimizer, loss_fn: Callable = cross_entropy, *, ensemble: bool = False,
                    grad: str | None = None):
    """Return ``step(params, state, opt_state, x, y, rng=None) -> (params, state, opt_state, metrics)``.

    ``metrics`` holds detached ``loss`` and ``accuracy`` (per member ``[N]`` for an ensemble). For an
    ensemble, ``x``/``y`` are one batch shared by all members (``[B, ...]``) or one per member
    (``[N, B, ...]``), and ``rng`` is one key (split per member) or ``N`` keys.
    """
    grad = grad or ("func" if ensemble else "autograd")
    if grad not in ("autograd", "func"):
        raise ValueError(f"grad must be 'autograd' or 'func', got {grad!r}")
    if ensemble and grad != "func":
        raise ValueError("ensemble train steps differentiate with torch.func (grad='func')")

    def objective(params, state, x, y, rng):
        logits, new_state = model.apply(params, state, x, train=True, rng=rng)
        loss = loss_fn(logits, y)
        return loss, (new_state, loss.detach(), accuracy(logits.detach(), y))

    func_grad = torch.func.grad(objective, has_aux=True)

    def grads_autograd(params, state, x, y, rng):
        names = list(vtree.flatten(params))
        leaves = [t.detach().requires_grad_(True) for t in vtree.flatten(params).values()]
        with torch.enable_grad():
            loss, aux = objective(vtree.unflatten(dict(zip(names, leaves))), state, x, y, rng)
            g = torch.autograd.grad(loss, leaves)
        return vtree.unflatten(dict(zip(names, g))), aux

    def step(params, state, opt_state, x, y, rng=None):
        if ensemble:
            n = ensemble_size(params)
            keys = member_keys(rng, n)
            shared = x.dim() == 4
            in_dims = (0, 0, None if shared else 0, None if shared else 0, None if keys is None else 0)
            grads, (new_state, loss, acc) = torch.vmap(func_grad, in_dims=in_dims)(params, state, x, y, keys)
        elif grad == "func":
            grads, (new_state, loss, acc) = func_grad(params, state, x, y, rng)
        else:
            grads, (new_state, loss, acc) = grads_autograd(params, state, x, y, rng)
        params, opt_state = optimizer.update(grads, opt_state, params)
        new_state = vtree.tree_map(torch.Tensor.detach, new_state)
        return params, new_state, opt_state, {"loss": loss, "accuracy": acc}

    return step
