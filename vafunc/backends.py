"""How a scope's layers run: one backend per call, chosen once by the kit's ``apply``.

A :class:`vafunc.kit.Scope` layer method resolves its tensors by name and hands them to the
call's backend, which runs the layer one way:

* :class:`Plain`: the aten ops (also init mode, on meta tensors, and a user's ``torch.vmap``
  through :mod:`vafunc.vmap_rules`);
* :class:`Taped`: per-sample gradients and norms from one backward
  (:class:`vafunc.persample.Tape`): convolutions and linear layers through the tape, the norms
  normalised without their affine part, which the tape applies;
* :class:`Members`: N stacked members in the batch axis (:mod:`vafunc.members`); the layers with
  bare parameters it has no lowering for raise :class:`vafunc.members.NotCovered`.

torch_compat's module-bound scope replaces the name lookup itself (each layer is a module call)
and is not a backend here: ``vafunc/`` holds no ``nn.Module``.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import layers as L
from . import members as M
from . import vmap_rules as VR

__all__ = ["Plain", "Taped", "Members", "PLAIN"]

_EMPTY: dict = {}


class Plain:
    """The aten ops."""

    def conv(self, x, w, b, stride, padding, dilation, groups):
        conv = VR.conv2d if VR.wants(w) else F.conv2d  # VR: a user's torch.vmap over member weights
        return conv(x, w, b, stride, padding, dilation, groups)

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

    def param(self, t, batched: bool):
        return t

    def layer_scale(self, t):
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


class Taped(Plain):
    """Per-sample gradients: the parameterised part of each layer goes through ``tape``."""

    def __init__(self, tape):
        self.tape = tape

    def conv(self, x, w, b, stride, padding, dilation, groups):
        return self.tape.conv(x, w, b, stride, padding, dilation, groups)

    def linear(self, x, w, b):
        return self.tape.linear(x, w, b)

    linear_with = linear

    def batch_norm(self, x, p, s, *, train, momentum, eps):
        if train:  # batch statistics couple the samples: torch's kernel, taped through autograd
            return L.batch_norm(p, s, x, train=True, momentum=momentum, eps=eps)
        xhat = F.batch_norm(x, s["running_mean"], s["running_var"], None, None, False, 0.0, eps)
        return self.tape.affine(xhat, p.get("weight"), p.get("bias"), 1), s

    def group_norm(self, x, groups, w, b, eps):
        return self.tape.affine(F.group_norm(x, groups, None, None, eps), w, b, 1)

    def layer_norm(self, x, w, b, eps):
        return self.tape.affine(F.layer_norm(x, (x.shape[-1],), None, None, eps), w, b, -1)

    def layer_norm2d(self, x, w, b, eps):
        return self.tape.affine(L.layer_norm2d(_EMPTY, x, eps=eps), w, b, 1)

    def param(self, t, batched: bool):
        return self.tape.expand(t, t.dim()) if batched else t

    def layer_scale(self, t):
        return self.tape.expand(t, 4)


class Members(Plain):
    """``n`` members stacked in the batch axis; ``shared``: ``(the [N*B] input, the [B] batch
    every member shares)`` when the input is one batch for all (a first convolution then runs on
    it once per member's weights)."""

    def __init__(self, n: int, shared=None):
        self.n, self.shared = n, shared

    def conv(self, x, w, b, stride, padding, dilation, groups):
        sh = self.shared
        if sh is not None and x is sh[0] and groups == 1:
            return M.conv(sh[1], w, b, stride, padding, dilation, groups, self.n, shared=True)
        return M.conv(x, w, b, stride, padding, dilation, groups, self.n)

    def linear(self, x, w, b):
        return M.linear(x, w, b, self.n)

    def linear_with(self, x, w, b):
        raise M.NotCovered("linear_with")

    def batch_norm(self, x, p, s, *, train, momentum, eps):
        return M.batch_norm(x, p, s, train=train, momentum=momentum, eps=eps, n=self.n)

    def group_norm(self, x, groups, w, b, eps):
        return M.affine(F.group_norm(x, groups, None, None, eps), w, b, self.n, 1)

    def layer_norm(self, x, w, b, eps):
        return M.affine(F.layer_norm(x, (x.shape[-1],), None, None, eps), w, b, self.n, -1)

    def layer_norm2d(self, x, w, b, eps):
        return M.affine(L.layer_norm2d(_EMPTY, x, eps=eps), w, b, self.n, 1)

    def param(self, t, batched: bool):
        raise M.NotCovered("bare parameter")

    def layer_scale(self, t):
        raise M.NotCovered("layer scale")

    def buffer(self) -> None:
        raise M.NotCovered("buffer")

    def attention(self, rate: float, train: bool) -> None:
        if rate and train:
            raise M.NotCovered("attention dropout")

    def dropout(self, x, rate, rng, train):
        return M.dropout(x, rate, rng, train=train, n=self.n)

    def drop_path(self, x, rate, rng, train):
        return M.drop_path(x, rate, rng, train=train, n=self.n)
