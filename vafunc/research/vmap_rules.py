"""A user's own ``torch.vmap`` over ``model.apply`` lowered like members mode.

``torch.vmap(lambda p, s: model.apply(p, s, x))(P, S)`` is what a JAX user writes for an
ensemble. torch's batching rule turns every member-batched convolution into an NCHW grouped
convolution, the slowest lowering measured on CPUs (see benchmarks/README.md for the figures). The
kit's convolution therefore routes a member-batched weight through ``vafunc::member_conv2d``, a
``torch.library`` custom operator whose vmap rule is :func:`vafunc.research.members.conv`: the lowering
picked by the layer's shape (centre taps on 1x1 maps, batched matrix products, grouped
convolutions on medium maps, each member's own convolution on large ones; one convolution with
every member's filters when all members share the input).

When does the kit take it (:func:`vafunc.core.backends.wants_member_conv`): the weight is a vmap-batched
tensor at the innermost
transform level, no gradient is being recorded for it (the operator has no autograd formula:
``vmap(grad(...))`` wraps the weight in a gradient level first and keeps torch's own rule, and
so does ``torch.compile``, for which a custom operator would be opaque), and the weight is 4-D.
Everything else (single models, ``vafunc.compile``, the members mode itself) emits the plain aten
convolution, so inductor sees what it always saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vafunc.core.backends import member_conv2d
from vafunc.research import members as M

__all__: list[str] = []  # registers the vmap rule of vafunc::member_conv2d on import


def _front(t: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(n, *t.shape) if dim is None else t.movedim(dim, 0)


@member_conv2d.register_vmap
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
