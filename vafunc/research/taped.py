"""The kit's backend for per-sample gradients (:mod:`vafunc.research.persample`): each layer's
parameterised part goes through a :class:`~vafunc.research.persample.Tape`, which records what
one backward needs for every sample's gradient (or its norm)."""

from __future__ import annotations

import torch.nn.functional as F

from vafunc.core import layers as L
from vafunc.core.backends import Plain

__all__ = ["Taped"]

_EMPTY: dict = {}


class Taped(Plain):
    """Per-sample gradients: the parameterised part of each layer goes through ``tape``."""

    def __init__(self, tape):
        self.tape = tape

    def conv(self, x, w, b, stride, padding, dilation, groups):
        return self.tape.conv(x, w, b, stride, padding, dilation, groups)

    def linear(self, x, w, b):
        return self.tape.linear(x, w, b)

    def linear_with(self, x, w, b):
        if b is None or id(b) in self.tape.leaves:
            return self.tape.linear(x, w, b)
        # a bias the family built from bare parameters (EVA-02's q/v biases): already per-sample
        return self.tape.linear(x, w, None) + b

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

    def param(self, t, batched: bool | int):
        if not batched:
            return t
        return self.tape.expand(t, t.dim() if batched is True else int(batched))
