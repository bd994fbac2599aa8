"""How a scope's layers run: one backend per call, chosen once by the kit's ``apply``.

A :class:`vafunc.core.kit.Scope` layer method resolves its tensors by name and hands them to the
call's backend, which runs the layer one way:

* :class:`Plain` (here): the aten ops (also init mode, on meta tensors, and a user's ``torch.vmap``
  through :func:`member_conv2d`, whose vmap rule :mod:`vafunc.research.vmap_rules` registers);
* :class:`vafunc.research.persample.Taped`: per-sample gradients and norms from one backward;
* :class:`vafunc.research.members.Members`: N stacked members in the batch axis.

Each lives with its concern; a caller hands its backend to ``apply(..., backend=)``, so the
kit imports none but :class:`Plain`.

torch_compat's module-bound scope replaces the name lookup itself (each layer is a module call)
and is not a backend here: ``vafunc/`` holds no ``nn.Module``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vafunc.core import layers as L
from vafunc.core._pairs import pair

__all__ = ["Plain", "PLAIN", "member_conv2d", "wants_member_conv"]

_is_batched = torch._C._functorch.is_batchedtensor


@torch.library.custom_op("vafunc::member_conv2d", mutates_args=())
def member_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """The convolution of :class:`Plain` for a weight batched by a user's ``torch.vmap``: a plain
    convolution whose vmap rule (:mod:`vafunc.research.vmap_rules`) is the members lowering."""
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


@member_conv2d.register_fake
def _(x, w, b, stride, padding, dilation, groups):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def wants_member_conv(w: torch.Tensor) -> bool:
    """Whether the conv with weight ``w`` takes :func:`member_conv2d` (:mod:`vafunc.research.vmap_rules`)."""
    return (
        not torch.compiler.is_compiling()
        and _is_batched(w)
        and w.dim() == 4
        and not (torch.is_grad_enabled() and w.requires_grad)
    )


_EMPTY: dict = {}


class Plain:
    """The aten ops. A backend also says how a call's input enters it (:meth:`enter`)."""

    def enter(self, x, taps):
        """``(the input the layers see, the backend of this call)``."""
        return x, self

    def conv(self, x, w, b, stride, padding, dilation, groups):
        if wants_member_conv(w) and not isinstance(padding, str):  # a user's torch.vmap over member weights
            return member_conv2d(x, w, b, pair(stride), pair(padding), pair(dilation), int(groups))
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    def linear(self, x, w, b):
        return F.linear(x, w, b)

    def linear_with(self, x, w, b):
        return F.linear(x, w, b)

    def batch_norm(self, x, p, s, *, train, momentum, eps):
        return L.batch_norm(p, s, x, train=train, momentum=momentum, eps=eps)

    def group_norm(self, x, groups, w, b, eps):
        return F.group_norm(x, groups, w, b, eps)

    def layer_norm(self, x, w, b, eps):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)  # float32 weights under a policy

    def layer_norm2d(self, x, w, b, eps):
        return L.layer_norm2d({"weight": w, "bias": b}, x, eps=eps)

    def param(self, t, batched: bool | int):
        return t

    def buffer(self) -> None:
        return None

    def attention(self, rate: float, train: bool) -> None:
        return None

    def dropout(self, x, rate, rng, train):
        return L.dropout(x, rate, rng, train=train)

    def drop_path(self, x, rate, rng, train):
        return L.drop_path(x, rate, rng, train=train)


PLAIN = Plain()
