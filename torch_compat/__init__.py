"""vafunc models as the reference's ``nn.Module`` trees.

>>> m = torch_compat.create("resnet50")
>>> m.load_state_dict(torchvision.models.resnet50().state_dict())   # strict=True
>>> m.layer4[-1].register_forward_hook(hook); m.fc = nn.Linear(2048, 10); logits = m(x)

The tree is derived from the family's one declaration (:mod:`torch_compat.tree`): torch's own
leaves (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``, ...), ``nn.Sequential`` where the
reference has one, and blocks whose forward runs the family's block function over their children,
so ``state_dict()`` keys, order and shapes are the reference's and every module call is a real one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

import vafunc
from vafunc.core import tree as vtree

from .tree import VafuncModule

__all__ = ["create", "VafuncModule", "from_model", "compile_ensemble"]


def from_model(
    model: vafunc.ModelDef,
    params: Mapping | None = None,
    state: Mapping | None = None,
    *,
    key=0,
    device=None,
    dtype=None,
) -> VafuncModule:
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


def compile_ensemble(
    model: vafunc.ModelDef,
    params: Mapping,
    state: Mapping,
    *,
    channels_last: bool = True,
    freeze: bool = True,
    dynamic: bool | None = None,
    method: str = "auto",
):
    """Compiled eval-mode inference for a stacked ensemble with fixed weights:
    ``f(x) -> logits [N, B, classes]``, ``x`` ``[B, C, H, W]`` (shared) or ``[N, B, C, H, W]``.

    Inductor freezing folds the weights in as constants (BatchNorm into the layers, convolution
    weights pre-packed). ``method``:

    * ``"batched"``: the members-mode forward (:mod:`vafunc.research.members`) with the stacked weights
      frozen, so everything the lowerings derive from the weights (a 1x1 map's centre taps, the
      grouped layout) is computed once at compile time; activations stay NCHW;
    * ``"loop"``: the members as torchvision-named modules in one graph, weights and activations
      in ``channels_last``;
    * ``"auto"`` (default): decided at the first call, by :func:`vafunc.research.members.prefer` with the
      compiled threshold (members mode for covered families on member batches of at most
      ``2**15`` pixels a member, ``B * H * W``, where it measured 1.2-2.3x the eager loop; the
      modules above).

    Runs under ``torch.no_grad``; later changes to ``params`` are not seen (the weights are copied).
    """
    from vafunc.research import members
    from vafunc.research.members import Members

    if method not in ("auto", "batched", "loop"):
        raise ValueError(f"method must be 'auto', 'batched' or 'loop', got {method!r}")
    n = vafunc.research.ensemble.ensemble_size(params)
    if method == "batched" and not members.covers(model):
        raise ValueError(f"{model.name} has no members-mode lowering (bare parameters); use method='loop'")
    built: dict = {}

    def modules():
        mods = [
            from_model(
                model, vtree.tree_map(lambda t: t[i].clone(), params), vtree.tree_map(lambda t: t[i].clone(), state)
            )
            for i in range(n)
        ]
        ens = _Ensemble(mods).eval()
        if channels_last:
            ens = ens.to(memory_format=torch.channels_last)
        return torch.compile(ens, dynamic=dynamic, options={"freezing": freeze})

    def batched(shared: bool):
        from vafunc.serving.compile import CompiledModel

        return CompiledModel(
            model,
            params,
            state,
            channels_last=False,
            dtype=None,
            dynamic=dynamic,
            freeze=freeze,
            mode=None,
            fullgraph=True,
            apply_kw={"backend": Members(n, shared_input=shared)},
        )

    def call(x: torch.Tensor) -> torch.Tensor:
        if "method" not in built:
            built["method"] = (
                method if method != "auto" else ("batched" if members.prefer(model, n, x, compiled=True) else "loop")
            )
        if built["method"] == "loop":
            if "loop" not in built:
                built["loop"] = modules()
            if x.dim() == 4 and channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                return built["loop"](x)
        if x.dim() not in (4, 5) or (x.dim() == 5 and x.shape[0] != n):
            raise ValueError(f"ensemble input must be [B, C, H, W] or [{n}, B, C, H, W], got {list(x.shape)}")
        shared = x.dim() == 4
        if shared not in built:
            built[shared] = batched(shared)
        b = x.shape[0] if shared else x.shape[1]
        return built[shared](x if shared else x.reshape(n * b, *x.shape[2:])).view(n, b, -1)

    call.method = lambda: built.get("method", method)  # which lowering the first call chose
    return call
