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
from typing import Any

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.blocks import drop_aux_remap, transform_input
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision, arXiv:1512.00567"

MIN_SIZE = 75
AUX_MIN_SIZE = 299  # the aux head's 5x5 conv needs a 5x5 map: 17x17 after Mixed_6e
#: torchvision's truncated-normal stds: 0.1 everywhere but the aux head's FC. (Its source also
#: sets ``stddev = 0.01`` on ``AuxLogits.conv1``, but on the BasicConv2d wrapper, which its init
#: loop never reads: the conv inside gets 0.1. We reproduce what torchvision does.)
DEFAULT_STD, AUX_FC_STD = 0.1, 0.001


def conv(
    m: Scope,
    name: str,
    x: Tensor,
    cout: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """torchvision's ``BasicConv2d`` ``name`` (tensors ``name.conv``, ``name.bn``): conv (no
    bias; padding 0 unless given) -> BatchNorm (eps 1e-3) -> ReLU (functional, as there)."""
    return m.block(
        name,
        Scope.conv_norm_act,
        x,
        cout,
        kernel,
        conv="conv",
        norm="bn",
        act="relu",
        stride=stride,
        padding=padding,
        tap=False,
    )


def conv_1x7(m: Scope, name: str, x: Tensor, cout: int) -> Tensor:
    return conv(m, name, x, cout, (1, 7), padding=(0, 3))


def conv_7x1(m: Scope, name: str, x: Tensor, cout: int) -> Tensor:
    return conv(m, name, x, cout, (7, 1), padding=(3, 0))


def conv_1x3(m: Scope, name: str, x: Tensor, cout: int) -> Tensor:
    return conv(m, name, x, cout, (1, 3), padding=(0, 1))


def conv_3x1(m: Scope, name: str, x: Tensor, cout: int) -> Tensor:
    return conv(m, name, x, cout, (3, 1), padding=(1, 0))


def max_pool_3x3_s2(x: Tensor) -> Tensor:
    """The grid reductions' 3x3/2 max pool (functional in torchvision too). A leaf function of FX
    graphs (``torch.fx.wrap``): :func:`vafunc.core.layers.max_pool2d` picks its CPU fast path by
    looking at the tensor, which symbolic tracing cannot do."""
    return L.max_pool2d(x, 3, 2)


torch.fx.wrap("max_pool_3x3_s2")


# --------------------------------------------------------------------------- the five blocks
# Every block calls its convolutions in torchvision's state_dict order.


def block_a(m: Scope, x: Tensor, pool_features: int) -> Tensor:
    """Figure 5 (35x35 grid; the 5x5 kept as in TF-slim): ``[N, cin, H, W] ->
    [N, 224 + pool_features, H, W]``."""
    b1 = conv(m, "branch1x1", x, 64, 1)
    b5 = conv(m, "branch5x5_2", conv(m, "branch5x5_1", x, 48, 1), 64, 5, padding=2)
    b3 = conv(m, "branch3x3dbl_1", x, 64, 1)
    b3 = conv(m, "branch3x3dbl_2", b3, 96, 3, padding=1)
    b3 = conv(m, "branch3x3dbl_3", b3, 96, 3, padding=1)
    bp = conv(m, "branch_pool", L.avg_pool2d(x, 3, 1, 1), pool_features, 1)
    return torch.cat([b1, b5, b3, bp], 1)


def block_b(m: Scope, x: Tensor) -> Tensor:
    """Grid reduction 35 -> 17 (Figure 10): ``[N, cin, H, W] -> [N, 480 + cin, (H-3)//2+1, ...]``."""
    b3 = conv(m, "branch3x3", x, 384, 3, stride=2)
    bd = conv(m, "branch3x3dbl_1", x, 64, 1)
    bd = conv(m, "branch3x3dbl_2", bd, 96, 3, padding=1)
    bd = conv(m, "branch3x3dbl_3", bd, 96, 3, stride=2)
    return torch.cat([b3, bd, max_pool_3x3_s2(x)], 1)


def block_c(m: Scope, x: Tensor, c7: int) -> Tensor:
    """Figure 6 (17x17 grid, 7x7 factorised into 1x7 and 7x1): ``[N, cin, H, W] -> [N, 768, H, W]``."""
    b1 = conv(m, "branch1x1", x, 192, 1)
    b7 = conv(m, "branch7x7_1", x, c7, 1)
    b7 = conv_1x7(m, "branch7x7_2", b7, c7)
    b7 = conv_7x1(m, "branch7x7_3", b7, 192)
    bd = conv(m, "branch7x7dbl_1", x, c7, 1)
    bd = conv_7x1(m, "branch7x7dbl_2", bd, c7)
    bd = conv_1x7(m, "branch7x7dbl_3", bd, c7)
    bd = conv_7x1(m, "branch7x7dbl_4", bd, c7)
    bd = conv_1x7(m, "branch7x7dbl_5", bd, 192)
    bp = conv(m, "branch_pool", L.avg_pool2d(x, 3, 1, 1), 192, 1)
    return torch.cat([b1, b7, bd, bp], 1)


def block_d(m: Scope, x: Tensor) -> Tensor:
    """Grid reduction 17 -> 8: ``[N, cin, H, W] -> [N, 512 + cin, (H-3)//2+1, ...]``."""
    b3 = conv(m, "branch3x3_2", conv(m, "branch3x3_1", x, 192, 1), 320, 3, stride=2)
    b7 = conv(m, "branch7x7x3_1", x, 192, 1)
    b7 = conv_1x7(m, "branch7x7x3_2", b7, 192)
    b7 = conv_7x1(m, "branch7x7x3_3", b7, 192)
    b7 = conv(m, "branch7x7x3_4", b7, 192, 3, stride=2)
    return torch.cat([b3, b7, max_pool_3x3_s2(x)], 1)


def block_e(m: Scope, x: Tensor) -> Tensor:
    """Figure 7 (8x8 grid, expanded filter banks: 1x3 and 3x1 side by side):
    ``[N, cin, H, W] -> [N, 2048, H, W]``."""
    b1 = conv(m, "branch1x1", x, 320, 1)
    b3 = conv(m, "branch3x3_1", x, 384, 1)
    b3 = torch.cat([conv_1x3(m, "branch3x3_2a", b3, 384), conv_3x1(m, "branch3x3_2b", b3, 384)], 1)
    bd = conv(m, "branch3x3dbl_2", conv(m, "branch3x3dbl_1", x, 448, 1), 384, 3, padding=1)
    bd = torch.cat([conv_1x3(m, "branch3x3dbl_3a", bd, 384), conv_3x1(m, "branch3x3dbl_3b", bd, 384)], 1)
    bp = conv(m, "branch_pool", L.avg_pool2d(x, 3, 1, 1), 192, 1)
    return torch.cat([b1, b3, bd, bp], 1)


BLOCKS = {"A": block_a, "B": block_b, "C": block_c, "D": block_d, "E": block_e}

#: Table 1 from the first Inception module on: (name, block kind, extra arguments of the block).
MIXED = (
    ("Mixed_5b", "A", (32,)),
    ("Mixed_5c", "A", (64,)),
    ("Mixed_5d", "A", (64,)),
    ("Mixed_6a", "B", ()),
    ("Mixed_6b", "C", (128,)),
    ("Mixed_6c", "C", (160,)),
    ("Mixed_6d", "C", (160,)),
    ("Mixed_6e", "C", (192,)),
    ("Mixed_7a", "D", ()),
    ("Mixed_7b", "E", ()),
    ("Mixed_7c", "E", ()),
)
AUX_AFTER = "Mixed_6e"
AUX_GRID = 17  # the grid after Mixed_6e at 299 (the smallest the aux head takes)


def aux_head(m: Scope, x: Tensor, num_classes: int, fc_init: Any) -> Tensor:
    """Auxiliary classifier (Section 4): 5x5/3 average pool, 1x1 conv to 128, 5x5 conv to 768,
    global average pool, FC. ``[N, 768, 17, 17] -> [N, num_classes]``."""
    y = conv(m, "conv1", conv(m, "conv0", L.avg_pool2d(x, 5, 3), 128, 1), 768, 5)
    return m.linear("fc", L.global_avg_pool(y), num_classes, init=fc_init)


# --------------------------------------------------------------------------- config / forward


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

    def __post_init__(self) -> None:
        if self.init_weights is None:
            object.__setattr__(self, "init_weights", True)
        check_config(self, bools=("aux_logits", "transform_input", "init_weights"), rates=("dropout",))
        if self.transform_input and self.in_channels != 3:
            raise ValueError(f"transform_input needs 3 (RGB) input channels, got in_channels={self.in_channels}")


def forward(m: Scope, cfg: InceptionV3Config, x: Tensor, *, aux: bool = False) -> Tensor | dict[str, Tensor]:
    """``x [N, C, H, W] -> logits [N, num_classes]``, H, W >= 75; with ``aux=True``
    ``{"logits", "aux"}`` (train and eval; needs ``aux_logits=True`` and H, W >= 299).

    Feature names: the stem's ``Conv2d_1a_3x3`` .. ``Conv2d_4a_3x3``, ``maxpool1``, ``maxpool2``
    and ``Mixed_5b`` .. ``Mixed_7c`` (35x35, 17x17 and 8x8 grids at 299).
    Dropout key: ``m.key(0)`` (the aux head has no dropout).
    """
    if aux and not cfg.aux_logits:
        raise ValueError("aux=True needs a model built with aux_logits=True (this one has no AuxLogits head)")
    if aux and min(x.shape[-2:]) < AUX_MIN_SIZE:
        raise ValueError(
            f"inception_v3's auxiliary head needs images of at least {AUX_MIN_SIZE}x{AUX_MIN_SIZE}, "
            f"got {x.shape[-2]}x{x.shape[-1]} (call with aux=False for inputs down to {MIN_SIZE}x{MIN_SIZE})"
        )
    if cfg.transform_input:
        x = transform_input(x)
    # the stem (Table 1, the rows before the first Inception module)
    y = m.tap("Conv2d_1a_3x3", conv(m, "Conv2d_1a_3x3", x, 32, 3, stride=2))
    y = m.tap("Conv2d_2a_3x3", conv(m, "Conv2d_2a_3x3", y, 32, 3))
    y = m.tap("Conv2d_2b_3x3", conv(m, "Conv2d_2b_3x3", y, 64, 3, padding=1))
    y = m.op("maxpool1", L.max_pool2d, y, 3, 2)
    y = m.tap("Conv2d_3b_1x1", conv(m, "Conv2d_3b_1x1", y, 80, 1))
    y = m.tap("Conv2d_4a_3x3", conv(m, "Conv2d_4a_3x3", y, 192, 3))
    y = m.op("maxpool2", L.max_pool2d, y, 3, 2)
    out = {}
    for name, kind, args in MIXED:
        y = m.block(name, BLOCKS[kind], y, *args)
        if name == AUX_AFTER and (aux or (m.initializing and cfg.aux_logits)):
            # init draws the head's tensors (which do not depend on the grid size) on the 17x17
            # grid of a 299 input, so the probed minimum size is the main network's
            a = y.new_empty(*y.shape[:2], AUX_GRID, AUX_GRID) if m.initializing else y
            fc_init = ("trunc_normal_default_bias", AUX_FC_STD) if cfg.init_weights else None
            out["aux"] = m.block("AuxLogits", aux_head, a, cfg.num_classes, fc_init, tap=False)
    y = m.op("avgpool", L.adaptive_avg_pool2d, y, 1, tap=False)
    logits = m.linear("fc", m.dropout(y, cfg.dropout, m.key(0), name="dropout").flatten(1), cfg.num_classes)
    return {"logits": logits, **out} if aux else logits


def defaults(cfg: InceptionV3Config) -> dict:
    """torchvision's init: conv and linear weights truncated normal at +-2 with std 0.1 (0.001
    for the aux head's FC), BN 1/0, linear biases torch's default.
    ``init_weights=False``: torch's default init."""
    d = {"eps": 1e-3}
    if cfg.init_weights:
        return {**d, "conv": ("trunc_normal", DEFAULT_STD), "linear": ("trunc_normal_default_bias", DEFAULT_STD)}
    return {**d, "conv": "kaiming_fan_in_uniform", "linear": "torch_default"}


FAMILY = family(
    "inception_v3",
    InceptionV3Config,
    forward,
    paper=PAPER,
    defaults=defaults,
    remap=drop_aux_remap(("AuxLogits.",), "AuxLogits"),
)

register(
    "inception_v3",
    FAMILY,
    params=27161264,
    reference=Reference("torchvision", "inception_v3"),
    notes=(
        "torchvision's weights=None defaults: AuxLogits built (27,161,264 params; 23,834,568 with "
        "aux_logits=False), transform_input=False; BatchNorm eps 1e-3; the aux head needs >= 299x299"
    ),
    extra={"aux_min_size": AUX_MIN_SIZE},
)
