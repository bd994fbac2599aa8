"""``nn.Module`` shells over vafunc models, named exactly like the reference modules.

>>> m = torch_compat.create("resnet50")
>>> m.load_state_dict(torchvision.models.resnet50().state_dict())   # strict=True
>>> logits = m(x)

Parameters and buffers live in a tree of plain container modules that mirrors the reference's
module names, so ``state_dict()`` keys, their order and shapes equal torchvision's. ``forward``
gathers them into ``(params, state)`` and calls the pure ``apply``; in train mode it writes the
new BatchNorm statistics back into the buffers, as torch's BatchNorm does.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

import vafunc
from vafunc import tree as vtree

__all__ = ["create", "VafuncModule", "from_model", "compile_ensemble"]


class _Node(nn.Module):
    """A plain container standing in for a reference submodule (holds tensors, no forward)."""


def _build(node: nn.Module, tree: Mapping) -> None:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            child = _Node()
            node.add_module(k, child)
            _build(child, v)
        elif k in vtree.STATE_LEAVES:
            node.register_buffer(k, v)
        else:
            node.register_parameter(k, nn.Parameter(v))


def _gather(node: nn.Module, want_state: bool) -> dict:
    out: dict = {}
    src = node._buffers if want_state else node._parameters
    for k, v in src.items():
        if v is not None:
            out[k] = v
    for k, child in node._modules.items():
        sub = _gather(child, want_state)
        if sub:
            out[k] = sub
    return out


def _write_back(node: nn.Module, new: Mapping) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping):
            _write_back(node._modules[k], v)
        else:
            node._buffers[k].copy_(v)


class VafuncModule(nn.Module):
    """An ``nn.Module`` whose ``forward`` is ``vafunc`` ``apply`` over its own tensors.

    Stochastic layers (dropout, stochastic depth) draw from a vafunc key; in train mode the
    module splits a fresh key per call from ``torch``'s global generator unless ``rng=`` is given.
    """

    def __init__(self, model: "vafunc.ModelDef", params: Mapping, state: Mapping):
        super().__init__()
        object.__setattr__(self, "model", model)
        _build(self, vtree.merge(params, state))

    def extra_repr(self) -> str:
        return f"vafunc model {self.model.name!r}"

    def params_and_state(self) -> tuple[dict, dict]:
        return _gather(self, False), _gather(self, True)

    def forward(self, x: torch.Tensor, *, rng=None, **kw):
        params, state = self.params_and_state()
        if self.training:
            # autograd may keep the running statistics it was given for the backward pass; hand
            # it copies so that writing the new statistics back in place below is safe.
            state = vtree.tree_map(torch.clone, state)
        if self.training and rng is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            rng = vafunc.random.key(seed, device=x.device)
        out, new_state = self.model.apply(params, state, x, train=self.training, rng=rng, **kw)
        if self.training:
            with torch.no_grad():
                _write_back(self, vtree.tree_map(lambda t: t.detach(), new_state))
        return out


def from_model(model: "vafunc.ModelDef", params: Mapping | None = None, state: Mapping | None = None,
               *, key=0, device=None, dtype=None) -> VafuncModule:
    """Wrap a ModelDef (and optionally given params/state) as a torchvision-named module."""
    if params is None or state is None:
        params, state = model.init(key, device=device, dtype=dtype)
    return VafuncModule(model, params, state)


def create(name: str, *, key=0, device=None, dtype=None, **config) -> VafuncModule:
    """``torchvision.models.get_model(name, **config)``'s twin: same state_dict names and shapes."""
    return from_model(vafunc.get_model(name, **config), key=key, device=device, dtype=dtype)


class _Ensemble(nn.Module):
    def __init__(self, modules):
        super().__init__()
        self.members = nn.ModuleList(modules)

    def forward(self, x):
        if x.dim() == 5:
            return torch.stack([m(x[i]) for i, m in enumerate(self.members)])
        return torch.stack([m(x) for m in self.members])


def compile_ensemble(model: "vafunc.ModelDef", params: Mapping, state: Mapping, *, channels_last: bool = True,
                     freeze: bool = True, dynamic: bool | None = None):
    """Compiled eval-mode inference for a stacked ensemble with fixed weights:
    ``f(x) -> logits [N, B, classes]``, ``x`` ``[B, C, H, W]`` (shared) or ``[N, B, C, H, W]``.

    The members become torchvision-named modules in one ``torch.compile`` graph with inductor
    freezing: weights are folded in as constants and convolutions pre-packed, activations and weights
    run in ``channels_last``. The members are held as modules, whose parameters inductor freezing
    folds; ``vafunc.compile`` gets the same folding for one model by marking its private weights as
    static addresses. Runs under ``torch.no_grad``;
    later changes to ``params`` are not seen (the weights are copied).
    """
    n = vafunc.ensemble.ensemble_size(params)
    mods = [from_model(model, vtree.tree_map(lambda t: t[i].clone(), params),
                       vtree.tree_map(lambda t: t[i].clone(), state)) for i in range(n)]
    ens = _Ensemble(mods).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        ens = ens.to(memory_format=fmt)
    compiled = torch.compile(ens, dynamic=dynamic, options={"freezing": freeze})

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            return compiled(x)

    return call
