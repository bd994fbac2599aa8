"""A user's own ``torch.vmap`` over ``model.apply`` lowered like members mode.

``torch.vmap(lambda p, s: model.apply(p, s, x))(P, S)`` is what a JAX user writes for an
ensemble. torch's batching rule turns every member-batched convolution into an NCHW grouped
convolution, the slowest lowering measured on CPUs (:mod:`vafunc.members` has the figures). The
kit's convolution therefore routes a member-batched weight through ``vafunc::member_conv2d``, a
``torch.library`` custom operator whose vmap rule is :func:`vafunc.members.conv`: the lowering
picked by the layer's shape (centre taps on 1x1 maps, batched matrix products, grouped
convolutions on medium maps, each member's own convolution on large ones; one convolution with
every member's filters when all members share the input).

When does the kit take it (:func:`wants`): the weight is a vmap-batched tensor at the innermost
transform level, no gradient is being recorded for it (the operator has no autograd formula:
``vmap(grad(...))`` wraps the weight in a gradient level first and keeps torch's own rule, and
so does ``torch.compile``, for which a custom operator would be opaque), and the weight is 4-D.
Everything else (single models, ``vafunc.compile``, the members mode itself) emits the plain aten
convolution, so inductor sees what it always saw.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import members as M
from ._pairs import pair

__all__ = ["wants", "conv2d"]

_is_batched = torch._C._functorch.is_batchedtensor


@torch.library.custom_op("vafunc::member_conv2d", mutates_args=())
def _member_conv2d(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int],
                   padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


@_member_conv2d.register_fake
def _(x, w, b, stride, padding, dilation, groups):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _front(t: torch.Tensor, dim: Optional[int], n: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(n, *t.shape) if dim is None else t.movedim(dim, 0)


@_member_conv2d.register_vmap
def _(info, in_dims, x, w, b, stride, padding, dilation, groups):
    xd, wd, bd = in_dims[:3]
    n = info.batch_size
    if wd is None:  # only the input is batched: the batch axes fold into one
        xs = x.movedim(xd, 0)
        y = F.conv2d(xs.reshape(-1, *xs.shape[2:]), w, b, stride, padding, dilation, groups)
        return y.view(n, -1, *y.shape[1:]), 0
    w = w.movedim(wd, 0)
    b = None if b is None else _front(b, bd, n)
    if xd is None:  # every member sees the same batch
        y = M.conv(x, w, b, stride, padding, dilation, groups, n, shared=True)
        return y.view(n, x.shape[0], *y.shape[1:]), 0
    xs = x.movedim(xd, 0)
    bsz = xs.shape[1]
    y = M.conv(xs.reshape(n * bsz, *xs.shape[2:]), w, b, stride, padding, dilation, groups, n)
    return y.view(n, bsz, *y.shape[1:]), 0


def wants(w: torch.Tensor) -> bool:
    """Whether the conv with weight ``w`` takes the custom operator (module notes)."""
    return (not torch.compiler.is_compiling() and _is_batched(w) and w.dim() == 4
            and not (torch.is_grad_enabled() and w.requires_grad))


def conv2d(x, w, b, stride, padding, dilation, groups):
    if isinstance(padding, str):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    return _member_conv2d(x, w, b, pair(stride), pair(padding), pair(dilation), int(groups))
