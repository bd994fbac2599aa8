"""Residual Attention Networks (Attention-56, Attention-92) in pytorchcv's layout.

Wang et al. 2017, "Residual Attention Network for Image Classification" (arXiv:1704.06904),
Sec. 3 and Table 2. A pre-activation bottleneck ResNet whose first three stages interleave
*attention modules*: a trunk branch ``T(x)`` (``t`` residual units) and a soft mask branch ``M(x)``
(an hourglass: max pooling down to the stage's smallest map, residual units, bilinear up-sampling
back with skip connections, two 1x1 convs and a sigmoid), combined by *attention residual
learning* ``H(x) = (1 + M(x)) * T(x)`` (Eq. 3), between ``p`` residual units before and after.
``p, t, r = 1, 2, 1`` (Sec. 3.4). Stage ``i`` (``i = 1, 2, 3``, at strides 4, 8, 16) has a mask
hourglass of depth ``4 - i``; Attention-56 has one module per stage, Attention-92 one, two and three.
The counts are those of the official Caffe prototxts, which pytorchcv reproduces: 31,810,728 and
52,466,344 parameters (the paper's Table 2 says 51.3M for Attention-92, which its prototxt does not
build).

**Names** are pytorchcv 0.0.74's ``resattnet56`` / ``resattnet92``: ``features.init_block.conv.{conv,bn}``
(7x7/2 conv, BN, ReLU) and ``features.init_block.pool`` (3x3/2 max pool); ``features.stage{1..4}.unit{j}``;
a residual unit has ``body.conv{1,2,3}.{bn,conv}`` (pre-activation: BN, ReLU, then the conv; the
3x3 carries the stride) and, where the shape changes, ``identity_conv`` (a bias-free 1x1 conv on the
*pre-activated* input, ResNet v2 style); an attention unit has ``init_blocks.blocks.block{k}``,
``hg.down_seq.down{d}.res_blocks.blocks.block{k}``, ``hg.up_seq.up{d}.res_blocks...``,
``hg.skip_seq.skip1.blocks.block{k}`` (the trunk), ``hg.skip_seq.skip{d}.skip1`` (``d > 1``),
``middle_block.conv{1,2}.{bn,conv}`` and ``final_block``; then ``features.post_activ.bn`` and the
classifier ``output``. (This bottleneck is not torchvision's post-activation ResNet block of
``resnet.py``: BatchNorm comes before each conv and the projection has none.)

**The mask branch** (pytorchcv's ``Hourglass``): with ``x_0`` the unit's input after ``init_blocks``
and ``x_d = down_d(x_{d-1})`` (3x3/2 max pool, then ``r`` residual units), from the deepest level
up, ``y = up_d(y) + skip_d(x_{d-1})``, where ``up_d`` is ``r`` residual units then a bilinear
up-sampling with ``align_corners=True``, ``skip_1`` is the trunk (``t`` units) and ``skip_d``,
``d > 1``, is ``x + unit(x)``. The mask is ``sigmoid(middle_block(y))``, the trunk ``skip_1(x_0)``.
pytorchcv doubles the map (``scale_factor=2``); here the map is up-sampled **to its skip's size**,
which is the same computation wherever the pooled sizes halve exactly (with ``align_corners=True``
the interpolation weights depend only on the two sizes), and also works where a pooled side was odd.

**Input sizes.** pytorchcv ends in ``AvgPool2d(7)``, so it runs only at 221..224 (a 7x7 last map
whose stage-1 map halves three times); here the last pool is global (equal to pytorchcv's at 224),
and every size the convolutions and pools accept works (``model.min_size``, probed).

**Init** (pytorchcv's ``_init_params``): every conv ``kaiming_uniform_`` (fan in, gain sqrt(2)),
BatchNorm 1/0, ``output`` torch's default ``nn.Linear`` init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Wang et al. 2017, Residual Attention Network for Image Classification, arXiv:1704.06904"

#: depth -> (attention modules in stages 1..3, (p, t, r)): pytorchcv's table (``get_resattnet``),
#: which follows the paper's Sec. 3.4 (Attention-452 uses p, t, r = 2, 4, 3)
DEPTHS = {
    56: ((1, 1, 1), (1, 2, 1)),
    92: ((1, 2, 3), (1, 2, 1)),
    128: ((2, 3, 4), (1, 2, 1)),
    164: ((3, 4, 5), (1, 2, 1)),
    200: ((4, 5, 6), (1, 2, 1)),
    236: ((5, 6, 7), (1, 2, 1)),
    452: ((5, 6, 7), (2, 4, 3)),
}
STEM = 64
WIDTHS = (256, 512, 1024, 2048)  # output channels of the four stages (bottleneck width / 4 inside)
LAST_STAGE_UNITS = 3  # stage 4: residual units only


@dataclass(frozen=True)
class ResAttNetConfig:
    """pytorchcv ``get_resattnet`` / ``ResAttNet`` keywords: ``blocks`` (the depth, a key of
    :data:`DEPTHS`), ``num_classes``, ``in_channels``."""

    blocks: int = 56
    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.blocks not in DEPTHS:
            raise ValueError(f"blocks must be one of {sorted(DEPTHS)}, got {self.blocks!r}")
        check_config(self)


class Unit(NamedTuple):
    """A pre-activation bottleneck residual unit: ``cin -> cout`` channels (``cout / 4`` inside), the
    3x3 conv's ``stride``."""

    cin: int
    cout: int
    stride: int = 1


class Attention(NamedTuple):
    """An attention module on ``channels`` channels: hourglass ``depth`` and ``(p, t, r)``."""

    channels: int
    depth: int
    scales: tuple


def plan(cfg: ResAttNetConfig) -> tuple[tuple[Unit | Attention, ...], ...]:
    """The units of each stage: a (strided, except in stage 1) residual unit first, then the stage's
    attention modules (stages 1-3) or two more residual units (stage 4)."""
    counts, scales = DEPTHS[cfg.blocks]
    cin, stages = STEM, []
    for i, width in enumerate(WIDTHS):
        units: list[Unit | Attention] = [Unit(cin, width, 1 if i == 0 else 2)]
        if i < len(counts):
            units += [Attention(width, len(WIDTHS) - 1 - i, scales)] * counts[i]
        else:
            units += [Unit(width, width)] * (LAST_STAGE_UNITS - 1)
        stages.append(tuple(units))
        cin = width
    return tuple(stages)


# --------------------------------------------------------------------------- residual units


def pre_conv(m: Scope, x: Tensor, cout: int, kernel: int, stride: int = 1) -> Tensor:
    """pytorchcv's ``PreConvBlock``: BatchNorm ``bn``, ReLU ``activ``, conv ``conv`` (bias-free, padded
    to keep the size at stride 1). ``[N, C, H, W] -> [N, cout, H / stride, W / stride]``."""
    return m.conv("conv", _pre_activation(m, x), cout, kernel, stride=stride, padding=kernel // 2)


def pre_conv_keep(m: Scope, x: Tensor, cout: int) -> tuple[Tensor, Tensor]:
    """:func:`pre_conv` (1x1) that also returns its pre-activated input (``return_preact=True``):
    ``(conv output, relu(bn(x)))``, the second read by the unit's projection shortcut."""
    a = _pre_activation(m, x)
    return m.conv("conv", a, cout, 1, padding=0), a


def _pre_activation(m: Scope, x: Tensor) -> Tensor:
    return m.op("activ", L.relu_, m.batch_norm("bn", x), tap=False)  # in place on the fresh BN output


def bottleneck(m: Scope, x: Tensor, u: Unit) -> tuple[Tensor, Tensor]:
    """pytorchcv's ``PreResBottleneck`` (``body``): 1x1, 3x3 (``stride``), 1x1 pre-activated convs.
    Returns ``(residual [N, cout, H / s, W / s], the first pre-activation [N, cin, H, W])``."""
    mid = u.cout // 4
    y, a = m.block("conv1", pre_conv_keep, x, mid, tap=False)
    y = m.block("conv2", pre_conv, y, mid, 3, u.stride, tap=False)
    return m.block("conv3", pre_conv, y, u.cout, 1, tap=False), a


def residual_unit(m: Scope, x: Tensor, u: Unit) -> Tensor:
    """pytorchcv's ``ResBlock``: ``body(x) + shortcut``, the shortcut the input itself or, where the
    shape changes, ``identity_conv`` (1x1, stride) on the body's first pre-activation."""
    y, a = m.block("body", bottleneck, x, u, tap=False)
    if u.cin != u.cout or u.stride != 1:
        return y + m.conv("identity_conv", a, u.cout, 1, stride=u.stride, padding=0)
    return y + x


def units(m: Scope, x: Tensor, u: Unit, n: int) -> Tensor:
    """pytorchcv's ``ResBlockSequence``: ``n`` residual units at ``blocks.block{k}`` (an
    ``nn.Sequential``)."""
    return m.block("blocks", _chain, x, u, n, tap=False, sequential=True)


def _chain(m: Scope, x: Tensor, u: Unit, n: int) -> Tensor:
    for k in range(n):
        x = m.block(f"block{k + 1}", residual_unit, x, u, tap=False)
    return x


# --------------------------------------------------------------------------- the attention module


def down(m: Scope, x: Tensor, u: Unit, r: int) -> Tensor:
    """``DownAttBlock``: 3x3/2 max pool ``pool``, ``r`` residual units ``res_blocks``."""
    return m.block("res_blocks", units, m.op("pool", L.max_pool2d, x, 3, 2, 1, tap=False), u, r, tap=False)


def up(m: Scope, x: Tensor, u: Unit, r: int, size: tuple[int, int]) -> Tensor:
    """``UpAttBlock``: ``r`` residual units ``res_blocks``, then bilinear up-sampling
    (``align_corners=True``) to ``size``, the skip's."""
    y = m.block("res_blocks", units, x, u, r, tap=False)
    return L.resize_bilinear(y, size, align_corners=True)


def double_skip(m: Scope, x: Tensor, u: Unit) -> Tensor:
    """``DoubleSkipBlock`` (the skips below the first level): ``x + unit(x)``, the unit at ``skip1``."""
    return x + m.block("skip1", residual_unit, x, u, tap=False)


def skip(m: Scope, x: Tensor, u: Unit, d: int, t: int) -> Tensor:
    """The skip of level ``d``: the trunk (``t`` units) at the top, :func:`double_skip` below."""
    if d == 1:
        return m.block("skip1", units, x, u, t, tap=False)
    return m.block(f"skip{d}", double_skip, x, u, tap=False)


def hourglass(m: Scope, x: Tensor, a: Attention) -> tuple[Tensor, Tensor]:
    """pytorchcv's ``Hourglass(return_first_skip=True)`` (``hg``): the mask branch before its 1x1
    convs and the trunk, ``(y [N, C, H, W], trunk [N, C, H, W])`` (module docstring)."""
    p, t, r = a.scales
    u = Unit(a.channels, a.channels)
    downs, ups, skips = (m.child(n, module=("Sequential", ())) for n in ("down_seq", "up_seq", "skip_seq"))
    xs = [x]
    for d in range(1, a.depth + 1):
        xs.append(downs.block(f"down{d}", down, xs[-1], u, r, tap=False))
    if m.initializing:  # pytorchcv registers up1..upD, then skip1..skipD (its state_dict order); shapes only
        for d in range(1, a.depth + 1):
            ups.block(f"up{d}", up, xs[d], u, r, xs[d - 1].shape[-2:], tap=False)
        trunk = [skip(skips, xs[d - 1], u, d, t) for d in range(1, a.depth + 1)][0]
        return trunk, trunk
    y = xs[-1]
    for d in range(a.depth, 0, -1):
        y = ups.block(f"up{d}", up, y, u, r, xs[d - 1].shape[-2:], tap=False)
        trunk = skip(skips, xs[d - 1], u, d, t)
        y = y + trunk
    return y, trunk


def middle(m: Scope, x: Tensor, channels: int) -> Tensor:
    """``MiddleAttBlock``: two pre-activated 1x1 convs ``conv1``/``conv2`` and ``sigmoid``: the mask."""
    y = m.block("conv1", pre_conv, x, channels, 1, tap=False)
    y = m.block("conv2", pre_conv, y, channels, 1, tap=False)
    return m.op("sigmoid", torch.sigmoid, y, tap=False)


def attention(m: Scope, x: Tensor, a: Attention) -> Tensor:
    """An attention module (``AttBlock``): ``p`` units ``init_blocks``, the hourglass ``hg``, the mask
    ``middle_block``, ``(1 + mask) * trunk`` (Eq. 3), one unit ``final_block``.
    ``[N, C, H, W] -> [N, C, H, W]``."""
    p, _, _ = a.scales
    u = Unit(a.channels, a.channels)
    x = m.block("init_blocks", units, x, u, p, tap=False)
    y, trunk = m.block("hg", hourglass, x, a, tap=False)
    mask = m.block("middle_block", middle, y, a.channels, tap=False)
    return m.block("final_block", residual_unit, (1 + mask) * trunk, u, tap=False)


# --------------------------------------------------------------------------- the network


def stage(m: Scope, x: Tensor, specs: tuple) -> Tensor:
    for j, s in enumerate(specs):
        x = m.block(f"unit{j + 1}", attention if isinstance(s, Attention) else residual_unit, x, s)
    return x


def stem(m: Scope, x: Tensor) -> Tensor:
    """``ResAttInitBlock``: 7x7/2 conv, BN, ReLU (``conv.{conv,bn,activ}``), 3x3/2 max pool ``pool``."""
    y = m.block(
        "conv",
        Scope.conv_norm_act,
        x,
        STEM,
        7,
        conv="conv",
        norm="bn",
        act="relu",
        act_name="activ",
        stride=2,
        padding=3,
        tap=False,
    )
    return m.op("pool", L.max_pool2d, y, 3, 2, 1, tap=False)


def post_activation(m: Scope, x: Tensor) -> Tensor:
    """``PreActivation``: the last BatchNorm ``bn`` and ReLU ``activ``."""
    return _pre_activation(m, x)


def features(m: Scope, x: Tensor, cfg: ResAttNetConfig) -> Tensor:
    y = m.block("init_block", stem, x)
    for i, specs in enumerate(plan(cfg)):
        y = m.block(f"stage{i + 1}", stage, y, specs, sequential=True)
    y = m.block("post_activ", post_activation, y)
    return m.op("final_pool", L.adaptive_avg_pool2d, y, 1, tap=False)  # pytorchcv: AvgPool2d(7) (224 only)


def forward(m: Scope, cfg: ResAttNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (pytorchcv's module paths): ``features.init_block`` (stride 4), every unit
    ``features.stage{i}.unit{j}`` and stage ``features.stage{i}`` (strides 4, 8, 16, 32) and
    ``features.post_activ`` (the last map after its BatchNorm and ReLU)."""
    y = m.block("features", features, x, cfg, tap=False, sequential=True)
    return m.linear("output", torch.flatten(y, 1), cfg.num_classes)


FAMILY = family(
    "resattnet", ResAttNetConfig, forward, paper=PAPER, defaults={"conv": "kaiming_uniform", "linear": "torch_default"}
)

for _blocks, _n in [(56, 31810728), (92, 52466344)]:
    register(
        f"resattnet{_blocks}",
        FAMILY,
        params=_n,
        reference=Reference("pytorchcv", f"resattnet{_blocks}"),
        task="classification",
        blocks=_blocks,
    )
