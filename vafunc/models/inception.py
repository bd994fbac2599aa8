"""Inception v3 in torchvision's layout (the port of Google's TF-slim network).

Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision"
(arXiv:1512.00567): Table 1 (the network), Figures 5, 6 and 7 (the three module kinds, here
blocks A, C and E), Figure 10 / Section 7 (the grid-size reductions, blocks B and D) and
Section 4 (the auxiliary classifier). Every convolution is torchvision's ``BasicConv2d``
(conv without bias, BatchNorm eps 1e-3, ReLU).

State-dict names are torchvision's: ``Conv2d_1a_3x3`` .. ``Conv2d_4a_3x3``, ``Mixed_5b`` ..
``Mixed_7c`` (each with its branch convs, e.g. ``Mixed_5b.branch5x5_2.conv``), ``AuxLogits``
(only with ``aux_logits``) and ``fc``.

The auxiliary head is computed only when asked for: ``apply(..., aux=True)`` returns
``({"logits", "aux"}, new_state)`` in train and eval mode alike. It needs inputs of at least
299x299 (its 5x5 convolution runs on a 5/3-average-pooled 17x17 grid); the main network takes
75x75 and up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import layers as L
from ..registry import Family, Reference, check_config, register
from .googlenet import basic_conv, drop_aux_keys, init_basic_conv, init_linear, key, transform_input

PAPER = "Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision, arXiv:1512.00567"

MIN_SIZE = 75
AUX_MIN_SIZE = 299  # the aux head's 5x5 conv needs a 5x5 map: 17x17 after Mixed_6e
FEATURES_OUT = 2048
#: torchvision's truncated-normal stds: 0.1 everywhere but the aux head's FC. (Its source also
#: sets ``stddev = 0.01`` on ``AuxLogits.conv1``, but on the BasicConv2d wrapper, which its init
#: loop never reads: the conv inside gets 0.1. We reproduce what torchvision does.)
DEFAULT_STD, AUX_FC_STD = 0.1, 0.001


class Conv(NamedTuple):
    """One ``BasicConv2d``: channels, kernel (int or (kh, kw)), stride, padding."""

    cin: int
    cout: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @property
    def kw(self) -> dict:
        return {"stride": self.stride, "padding": self.padding}


def _1x7(cin, cout):
    return Conv(cin, cout, (1, 7), padding=(0, 3))


def _7x1(cin, cout):
    return Conv(cin, cout, (7, 1), padding=(3, 0))


def _1x3(cin, cout):
    return Conv(cin, cout, (1, 3), padding=(0, 1))


def _3x1(cin, cout):
    return Conv(cin, cout, (3, 1), padding=(1, 0))


def stem_convs(cin: int) -> dict:
    """The stem (Table 1, the rows before the first Inception module)."""
    return {
        "Conv2d_1a_3x3": Conv(cin, 32, 3, stride=2),
        "Conv2d_2a_3x3": Conv(32, 32, 3),
        "Conv2d_2b_3x3": Conv(32, 64, 3, padding=1),
        "Conv2d_3b_1x1": Conv(64, 80, 1),
        "Conv2d_4a_3x3": Conv(80, 192, 3),
    }


#: The stem's order, with its two 3x3 stride-2 max-pools.
STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2")


# --------------------------------------------------------------------------- the five blocks
# Each block kind has a table of its convolutions (``*_convs``: name -> Conv, used by init and
# apply alike) and a function wiring them (``block_*``: returns ``(y, new_state)``).


def a_convs(cin: int, pool_features: int) -> dict:
    return {
        "branch1x1": Conv(cin, 64, 1),
        "branch5x5_1": Conv(cin, 48, 1),
        "branch5x5_2": Conv(48, 64, 5, padding=2),
        "branch3x3dbl_1": Conv(cin, 64, 1),
        "branch3x3dbl_2": Conv(64, 96, 3, padding=1),
        "branch3x3dbl_3": Conv(96, 96, 3, padding=1),
        "branch_pool": Conv(cin, pool_features, 1),
    }


def block_a(conv, x):
    """Figure 5 (35x35 grid; the 5x5 kept as in TF-slim): ``[N, cin, H, W] ->
    [N, 224 + pool_features, H, W]``."""
    b1 = conv("branch1x1", x)
    b5 = conv("branch5x5_2", conv("branch5x5_1", x))
    b3 = conv("branch3x3dbl_3", conv("branch3x3dbl_2", conv("branch3x3dbl_1", x)))
    bp = conv("branch_pool", L.avg_pool2d(x, 3, 1, 1))
    return torch.cat([b1, b5, b3, bp], 1)


def b_convs(cin: int) -> dict:
    return {
        "branch3x3": Conv(cin, 384, 3, stride=2),
        "branch3x3dbl_1": Conv(cin, 64, 1),
        "branch3x3dbl_2": Conv(64, 96, 3, padding=1),
        "branch3x3dbl_3": Conv(96, 96, 3, stride=2),
    }


def block_b(conv, x):
    """Grid reduction 35 -> 17 (Figure 10): ``[N, cin, H, W] -> [N, 480 + cin, (H-3)//2+1, ...]``."""
    b3 = conv("branch3x3", x)
    bd = conv("branch3x3dbl_3", conv("branch3x3dbl_2", conv("branch3x3dbl_1", x)))
    return torch.cat([b3, bd, L.max_pool2d(x, 3, 2)], 1)


def c_convs(cin: int, c7: int) -> dict:
    return {
        "branch1x1": Conv(cin, 192, 1),
        "branch7x7_1": Conv(cin, c7, 1),
        "branch7x7_2": _1x7(c7, c7),
        "branch7x7_3": _7x1(c7, 192),
        "branch7x7dbl_1": Conv(cin, c7, 1),
        "branch7x7dbl_2": _7x1(c7, c7),
        "branch7x7dbl_3": _1x7(c7, c7),
        "branch7x7dbl_4": _7x1(c7, c7),
        "branch7x7dbl_5": _1x7(c7, 192),
        "branch_pool": Conv(cin, 192, 1),
    }


def block_c(conv, x):
    """Figure 6 (17x17 grid, 7x7 factorised into 1x7 and 7x1): ``[N, cin, H, W] -> [N, 768, H, W]``."""
    b1 = conv("branch1x1", x)
    b7 = x
    for i in (1, 2, 3):
        b7 = conv(f"branch7x7_{i}", b7)
    bd = x
    for i in (1, 2, 3, 4, 5):
        bd = conv(f"branch7x7dbl_{i}", bd)
    bp = conv("branch_pool", L.avg_pool2d(x, 3, 1, 1))
    return torch.cat([b1, b7, bd, bp], 1)


def d_convs(cin: int) -> dict:
    return {
        "branch3x3_1": Conv(cin, 192, 1),
        "branch3x3_2": Conv(192, 320, 3, stride=2),
        "branch7x7x3_1": Conv(cin, 192, 1),
        "branch7x7x3_2": _1x7(192, 192),
        "branch7x7x3_3": _7x1(192, 192),
        "branch7x7x3_4": Conv(192, 192, 3, stride=2),
    }


def block_d(conv, x):
    """Grid reduction 17 -> 8: ``[N, cin, H, W] -> [N, 512 + cin, (H-3)//2+1, ...]``."""
    b3 = conv("branch3x3_2", conv("branch3x3_1", x))
    b7 = x
    for i in (1, 2, 3, 4):
        b7 = conv(f"branch7x7x3_{i}", b7)
    return torch.cat([b3, b7, L.max_pool2d(x, 3, 2)], 1)


def e_convs(cin: int) -> dict:
    return {
        "branch1x1": Conv(cin, 320, 1),
        "branch3x3_1": Conv(cin, 384, 1),
        "branch3x3_2a": _1x3(384, 384),
        "branch3x3_2b": _3x1(384, 384),
        "branch3x3dbl_1": Conv(cin, 448, 1),
        "branch3x3dbl_2": Conv(448, 384, 3, padding=1),
        "branch3x3dbl_3a": _1x3(384, 384),
        "branch3x3dbl_3b": _3x1(384, 384),
        "branch_pool": Conv(cin, 192, 1),
    }


def block_e(conv, x):
    """Figure 7 (8x8 grid, expanded filter banks: 1x3 and 3x1 side by side):
    ``[N, cin, H, W] -> [N, 2048, H, W]``."""
    b1 = conv("branch1x1", x)
    b3 = conv("branch3x3_1", x)
    b3 = torch.cat([conv("branch3x3_2a", b3), conv("branch3x3_2b", b3)], 1)
    bd = conv("branch3x3dbl_2", conv("branch3x3dbl_1", x))
    bd = torch.cat([conv("branch3x3dbl_3a", bd), conv("branch3x3dbl_3b", bd)], 1)
    bp = conv("branch_pool", L.avg_pool2d(x, 3, 1, 1))
    return torch.cat([b1, b3, bd, bp], 1)


BLOCKS = {"A": (a_convs, block_a), "B": (b_convs, block_b), "C": (c_convs, block_c),
          "D": (d_convs, block_d), "E": (e_convs, block_e)}

#: Table 1 from the first Inception module on: (name, block kind, arguments of its ``*_convs``).
MIXED = (
    ("Mixed_5b", "A", (192, 32)),
    ("Mixed_5c", "A", (256, 64)),
    ("Mixed_5d", "A", (288, 64)),
    ("Mixed_6a", "B", (288,)),
    ("Mixed_6b", "C", (768, 128)),
    ("Mixed_6c", "C", (768, 160)),
    ("Mixed_6d", "C", (768, 160)),
    ("Mixed_6e", "C", (768, 192)),
    ("Mixed_7a", "D", (768,)),
    ("Mixed_7b", "E", (1280,)),
    ("Mixed_7c", "E", (2048,)),
)
AUX_AFTER = "Mixed_6e"


def aux_convs(cin: int = 768) -> dict:
    return {"conv0": Conv(cin, 128, 1), "conv1": Conv(128, 768, 5)}


def aux_head(conv, p, x):
    """Auxiliary classifier (Section 4): 5x5/3 average pool, 1x1 conv to 128, 5x5 conv to 768,
    global average pool, FC. ``[N, 768, 17, 17] -> [N, num_classes]``."""
    y = conv("conv1", conv("conv0", L.avg_pool2d(x, 5, 3)))
    return L.linear(p["fc"], L.global_avg_pool(y))


def block_convs(kind: str, args: tuple) -> dict:
    return BLOCKS[kind][0](*args)


def run_convs(p, s, specs: dict, *, train: bool):
    """``conv(name, x) -> y`` over the BasicConv2d's of one block, and the dict that collects
    their new BatchNorm state (a fresh copy of ``s``; the caller's ``s`` is not touched)."""
    new = dict(s)

    def conv(name, x):
        y, new[name] = basic_conv(p[name], s[name], x, train=train, **specs[name].kw)
        return y

    return conv, new


# --------------------------------------------------------------------------- config / init / apply


@dataclass(frozen=True)
class InceptionV3Config:
    """torchvision ``Inception3`` keywords (``inception_blocks`` aside); defaults are
    torchvision's with ``weights=None``. ``init_weights=None`` means ``True``, as in torchvision."""

    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = False
    init_weights: bool | None = True
    dropout: float = 0.5
    in_channels: int = 3

    def __post_init__(self):
        if self.init_weights is None:
            object.__setattr__(self, "init_weights", True)
        check_config(self, bools=("aux_logits", "transform_input", "init_weights"), rates=("dropout",))
        if self.transform_input and self.in_channels != 3:
            raise ValueError(f"transform_input needs 3 (RGB) input channels, got in_channels={self.in_channels}")


def init(cfg: InceptionV3Config, ini) -> dict:
    """torchvision's init: conv and linear weights truncated normal at +-2 with std 0.1 (0.001
    for the aux head's FC), BN 1/0, linear biases torch's default.
    ``init_weights=False``: torch's default init."""

    def std(s):
        return s if cfg.init_weights else None

    def convs(specs):
        return {n: init_basic_conv(ini, c.cin, c.cout, c.kernel, std=std(DEFAULT_STD)) for n, c in specs.items()}

    t = convs(stem_convs(cfg.in_channels))
    for name, kind, args in MIXED:
        t[name] = convs(block_convs(kind, args))
        if name == AUX_AFTER and cfg.aux_logits:
            t["AuxLogits"] = {
                **convs(aux_convs()),
                "fc": init_linear(ini, 768, cfg.num_classes, std=std(AUX_FC_STD)),
            }
    t["fc"] = init_linear(ini, FEATURES_OUT, cfg.num_classes, std=std(DEFAULT_STD))
    return t


def apply(cfg: InceptionV3Config, params, state, x, *, train: bool = False, rng=None, taps=None, aux: bool = False):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``, H, W >= 75; with ``aux=True``
    ``({"logits", "aux"}, new_state)`` (train and eval; needs ``aux_logits=True`` and H, W >= 299).

    Feature names (``taps``): the stem's ``Conv2d_1a_3x3`` .. ``Conv2d_4a_3x3``, ``maxpool1``,
    ``maxpool2`` and ``Mixed_5b`` .. ``Mixed_7c`` (35x35, 17x17 and 8x8 grids at 299).
    Dropout key: ``fold_in(rng, 0)`` (the aux head has no dropout).
    """
    if aux and not cfg.aux_logits:
        raise ValueError("aux=True needs a model built with aux_logits=True (this one has no AuxLogits head)")
    if aux and min(x.shape[-2:]) < AUX_MIN_SIZE:
        raise ValueError(
            f"inception_v3's auxiliary head needs images of at least {AUX_MIN_SIZE}x{AUX_MIN_SIZE}, "
            f"got {x.shape[-2]}x{x.shape[-1]} (call with aux=False for inputs down to {MIN_SIZE}x{MIN_SIZE})"
        )
    p, s = params, dict(state)
    if cfg.transform_input:
        x = transform_input(x)
    conv, s = run_convs(p, s, stem_convs(cfg.in_channels), train=train)
    y = x
    for name in STEM:
        y = L.max_pool2d(y, 3, 2) if name.startswith("maxpool") else conv(name, y)
        y = L.tap(taps, name, y)
    aux_logits = None
    for name, kind, args in MIXED:
        conv, s[name] = run_convs(p[name], s[name], block_convs(kind, args), train=train)
        y = L.tap(taps, name, BLOCKS[kind][1](conv, y))
        if aux and name == AUX_AFTER:
            conv, s["AuxLogits"] = run_convs(p["AuxLogits"], s["AuxLogits"], aux_convs(), train=train)
            aux_logits = aux_head(conv, p["AuxLogits"], y)
    if L.taps_complete(taps):
        return None, (s if train else state)
    y = L.dropout(L.global_avg_pool(y), cfg.dropout, key(rng, 0), train=train)
    logits = L.linear(p["fc"], y)
    out = {"logits": logits, "aux": aux_logits} if aux else logits
    return out, (s if train else state)


FAMILY = Family(
    name="inception_v3",
    config=InceptionV3Config,
    init=init,
    apply=apply,
    min_size=lambda cfg: MIN_SIZE,
    paper=PAPER,
    remap=drop_aux_keys(("AuxLogits.",), "AuxLogits"),
)

register(
    "inception_v3", FAMILY, params=27161264, reference=Reference("torchvision", "inception_v3"),
    deterministic_train={"dropout": 0.0},
    notes=(
        "torchvision's weights=None defaults: AuxLogits built (27,161,264 params; 23,834,568 with "
        "aux_logits=False), transform_input=False; BatchNorm eps 1e-3; the aux head needs >= 299x299"
    ),
    extra={"aux_outputs": (("aux", "aux_logits"),), "aux_min_size": AUX_MIN_SIZE},
)
