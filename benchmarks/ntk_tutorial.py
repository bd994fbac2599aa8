"""The torch.func NTK tutorial's small CNN and its two methods (Jacobian contraction, NTK-vector
products), written against an ``nn.Module`` through ``functional_call``; the same network declared
on the kit (:data:`CNN`). The oracle of ``tests/test_ntk.py`` and the baseline of ``python -m
benchmarks curvature --part ntk``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from vafunc.core.kit import family
from vafunc.core.registry import ModelDef

__all__ = ["TutorialCNN", "CNN", "ntk_jacobian_contraction", "ntk_vector_products"]

EINSUM = {"full": "iaf,jbf->ijab", "trace": "iaf,jaf->ij", "diagonal": "iaf,jaf->ija"}


# --------------------------------------------------------------------------- the tutorial's model


class TutorialCNN(nn.Module):
    """The tutorial's network: three 3x3 convs (32 channels, no padding, ReLU) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 32, 3)
        self.conv3 = nn.Conv2d(32, 32, 3)
        self.fc = nn.Linear(32 * 26 * 26, 10)

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        return self.fc(self.conv3(x).flatten(1))


@dataclass(frozen=True)
class CNNConfig:
    num_classes: int = 10


def _cnn_forward(m, cfg, x):
    for name in ("conv1", "conv2"):
        x = m.conv(name, x, 32, 3, padding=0, bias=True).relu()
    x = m.conv("conv3", x, 32, 3, padding=0, bias=True)
    return m.linear("fc", x.flatten(1), cfg.num_classes)


CNN = ModelDef("tutorial_cnn", CNNConfig(), family("tutorial_cnn", CNNConfig, _cnn_forward, init_size=32))


# --------------------------------------------------------------------------- the tutorial's methods


def _single(module):
    def f(params, x):
        return functional_call(module, params, (x[None],))[0]

    return f


def ntk_jacobian_contraction(module, params, x1, x2, modes):
    """Method 1: each sample's Jacobian by ``vmap(jacrev)``, contracted leaf by leaf (per mode)."""
    f = _single(module)
    j1 = [j.flatten(2) for j in vmap(jacrev(f), (None, 0))(params, x1).values()]
    j2 = [j.flatten(2) for j in vmap(jacrev(f), (None, 0))(params, x2).values()]
    return {m: torch.stack([torch.einsum(EINSUM[m], a, b) for a, b in zip(j1, j2)]).sum(0) for m in modes}


def ntk_vector_products(module, params, x1, x2, mode):
    """Method 2: for each pair of samples, ``J2 J1^T e`` for every output basis vector ``e``
    (a vjp at x1, then a jvp at x2), vmapped over the basis and over both samples."""
    f = _single(module)

    def pair(a, b):
        out, pull = vjp(lambda p: f(p, a), params)

        def column(e):
            return jvp(lambda p: f(p, b), (params,), pull(e))[1]

        return vmap(column)(torch.eye(out.numel(), dtype=out.dtype))  # [K (x1's output), K (x2's)]

    full = vmap(vmap(pair, (None, 0)), (0, None))(x1, x2)
    return {"full": full, "trace": torch.einsum("ijaa->ij", full), "diagonal": torch.einsum("ijaa->ija", full)}[mode]
