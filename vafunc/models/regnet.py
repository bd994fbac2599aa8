"""RegNetX and RegNetY in torchvision's layout.

Radosavovic et al. 2020, "Designing Network Design Spaces" (arXiv:2003.13678). A RegNet is an
AnyNet (Sec. 3: stem, stages of residual bottleneck blocks, head) whose per-block widths follow a
quantized linear function (Sec. 3.3, Eq. 2-4): ``u_j = w_0 + w_a * j`` for block ``j < d``, each
``u_j`` is snapped to ``w_0 * w_m^s_j`` (``s_j`` the rounded log-ratio) and to a multiple of 8, and
every run of equal widths is one stage (stride 2). The models are the RegNetX (no SE) and RegNetY
(squeeze-and-excitation in every block, ratio 0.25 of the block's input width) models of Sec. 5
and Figs. 15/16, whose ``d, w_0, w_a, w_m, g`` are those of the authors' model zoo (pycls), plus
torchvision's RegNetY-128GF (the SWAG model, Singh et al. 2022). :data:`DESIGNS` holds each
model's ``(depth, w_0, w_a, w_m, group_width, se_ratio)``; the stages are derived from them by
:func:`stage_params` (torchvision's ``BlockParams.from_init_params``).

State-dict names are torchvision's: ``stem.{0,1}`` (3x3/2 conv-BN-ReLU),
``trunk_output.block{i}.block{i}-{j}.proj.{0,1}`` (the projection shortcut, when the shape
changes), ``...f.{a,b,c}.{0,1}`` (1x1, grouped 3x3, 1x1 conv-BN), ``...f.se.{fc1,fc2}`` (RegNetY)
and ``fc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import NamedTuple

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.blocks import make_divisible
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Radosavovic et al. 2020, Designing Network Design Spaces, arXiv:2003.13678"

#: torchvision's builders: ``(depth, w_0, w_a, w_m, group_width, se_ratio)`` per model.
DESIGNS = {
    "x_400mf": (22, 24, 24.48, 2.54, 16, None),
    "x_800mf": (16, 56, 35.73, 2.28, 16, None),
    "x_1_6gf": (18, 80, 34.01, 2.25, 24, None),
    "x_3_2gf": (25, 88, 26.31, 2.25, 48, None),
    "x_8gf": (23, 80, 49.56, 2.88, 120, None),
    "x_16gf": (22, 216, 55.59, 2.1, 128, None),
    "x_32gf": (23, 320, 69.86, 2.0, 168, None),
    "y_400mf": (16, 48, 27.89, 2.09, 8, 0.25),
    "y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
    "y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25),
    "y_3_2gf": (21, 80, 42.63, 2.66, 24, 0.25),
    "y_8gf": (17, 192, 76.82, 2.19, 56, 0.25),
    "y_16gf": (18, 200, 106.23, 2.48, 112, 0.25),
    "y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
}

#: published parameter counts (torchvision's weights metadata)
PARAMS = {
    "x_400mf": 5495976,
    "x_800mf": 7259656,
    "x_1_6gf": 9190136,
    "x_3_2gf": 15296552,
    "x_8gf": 39572648,
    "x_16gf": 54278536,
    "x_32gf": 107811560,
    "y_400mf": 4344144,
    "y_800mf": 6432512,
    "y_1_6gf": 11202430,
    "y_3_2gf": 19436338,
    "y_8gf": 39381472,
    "y_16gf": 83590140,
    "y_32gf": 145046770,
    "y_128gf": 644812894,
}


@dataclass(frozen=True)
class RegNetConfig:
    """torchvision's RegNet keywords: the design parameters of ``BlockParams.from_init_params``
    (``depth``, ``w_0``, ``w_a``, ``w_m``, ``group_width``, ``bottleneck_multiplier``,
    ``se_ratio``) and the ``RegNet`` keywords ``num_classes`` and ``stem_width``. The other
    ``RegNet`` keywords take modules (``stem_type``, ``block_type``, ``norm_layer``,
    ``activation``) and are not mirrored: the stem, block, BatchNorm and ReLU are fixed. RegNet
    has no dropout or stochastic depth."""

    depth: int = 22
    w_0: int = 24
    w_a: float = 24.48
    w_m: float = 2.54
    group_width: int = 16
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = None
    num_classes: int = 1000
    stem_width: int = 32
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_config(self, positive_ints=("depth", "group_width", "num_classes", "stem_width", "in_channels"))
        if self.w_a < 0 or self.w_0 <= 0 or self.w_m <= 1 or self.w_0 % 8 != 0:  # torchvision's check
            raise ValueError(
                f"invalid RegNet settings: need w_a >= 0, w_0 > 0 a multiple of 8 and w_m > 1, "
                f"got w_0={self.w_0}, w_a={self.w_a}, w_m={self.w_m}"
            )
        if not self.bottleneck_multiplier > 0:
            raise ValueError(f"bottleneck_multiplier must be positive, got {self.bottleneck_multiplier!r}")
        if self.se_ratio is not None and not self.se_ratio >= 0:
            raise ValueError(f"se_ratio must be None or >= 0, got {self.se_ratio!r}")
        # derived once per config, outside any traced forward (the rule runs torch ops and .tolist())
        object.__setattr__(
            self,
            "_stages",
            stage_params(self.depth, self.w_0, self.w_a, self.w_m, self.group_width, self.bottleneck_multiplier),
        )

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The network's stages (:func:`stage_params` of the design parameters)."""
        return self._stages


class Stage(NamedTuple):
    width: int  # output width of every block of the stage
    depth: int  # blocks
    group_width: int  # channels per group of the 3x3 conv


def stage_params(
    depth: int, w_0: int, w_a: float, w_m: float, group_width: int, bottleneck_multiplier: float = 1.0
) -> tuple[Stage, ...]:
    """The stages of a RegNet (paper Sec. 3.3, Eq. 2-4), computed as torchvision's
    ``BlockParams.from_init_params`` computes them (in float32 torch arithmetic, so every rounding
    is the same): per-block continuous widths ``w_0 + w_a * j``, quantized in log space with base
    ``w_m`` and to multiples of 8; runs of equal width form the stages; then widths and group
    widths are made compatible (the bottleneck width a multiple of the group width)."""
    quant = 8
    cont = torch.arange(depth, dtype=torch.float32) * w_a + w_0
    capacity = torch.round(torch.log(cont / w_0) / math.log(w_m))
    block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, capacity), quant)) * quant).int().tolist()
    stages = [(w, len(list(run))) for w, run in groupby(block_widths)]
    out = []
    for w, d in stages:
        w_bot = int(w * bottleneck_multiplier)
        g = min(group_width, w_bot)
        out.append(Stage(int(make_divisible(w_bot, g) / bottleneck_multiplier), d, g))
    return tuple(out)


# --------------------------------------------------------------------------- the network


def bottleneck_transform(
    m: Scope, x: Tensor, cin: int, width: int, stride: int, group_width: int, cfg: RegNetConfig
) -> Tensor:
    """``BottleneckTransform`` ``f``: 1x1 ``a`` -> grouped 3x3 ``b`` (stride) [-> SE ``se``] ->
    1x1 ``c`` (conv-BN, no activation). ``[N, cin, H, W] -> [N, width, H/stride, W/stride]``."""
    w_b = int(round(width * cfg.bottleneck_multiplier))
    y = m.block("a", Scope.conv_norm_act, x, w_b, 1, act="relu", tap=False)
    y = m.block("b", Scope.conv_norm_act, y, w_b, 3, act="relu", stride=stride, groups=w_b // group_width, tap=False)
    if cfg.se_ratio:  # the SE width is relative to the block's input width
        y = m.block(
            "se",
            Scope.squeeze_excite,
            y,
            int(round(cfg.se_ratio * cin)),
            init="kaiming_fan_out_default_bias",
            tap=False,
        )
    return m.block("c", Scope.conv_norm_act, y, width, 1, tap=False)


def res_bottleneck(
    m: Scope, x: Tensor, cin: int, width: int, stride: int, group_width: int, cfg: RegNetConfig
) -> Tensor:
    """``ResBottleneckBlock`` (paper Fig. 3/4; Y: with SE): ``relu(proj(x) + f(x))``, ``f`` the
    :func:`bottleneck_transform`. ``[N, cin, H, W] -> [N, width, H/stride, W/stride]``."""
    shortcut = x
    if cin != width or stride != 1:  # the projection is registered (and drawn) before f
        shortcut = m.block("proj", Scope.conv_norm_act, x, width, 1, stride=stride, tap=False)
    y = m.block("f", bottleneck_transform, x, cin, width, stride, group_width, cfg, tap=False, sequential=True)
    return m.op("activation", L.relu_, y.add_(shortcut), tap=False)  # y: a fresh BN output


def any_stage(m: Scope, x: Tensor, i: int, cin: int, stage: Stage, cfg: RegNetConfig) -> Tensor:
    """``AnyStage``: blocks ``block{i}-{j}`` from ``cin`` channels, the first with stride 2."""
    for j in range(stage.depth):
        x = m.block(
            f"block{i}-{j}",
            res_bottleneck,
            x,
            cin if j == 0 else stage.width,
            stage.width,
            2 if j == 0 else 1,
            stage.group_width,
            cfg,
        )
    return x


def trunk(m: Scope, x: Tensor, cfg: RegNetConfig) -> Tensor:
    cin = cfg.stem_width
    for i, stage in enumerate(cfg.stages, 1):
        x = m.block(f"block{i}", any_stage, x, i, cin, stage, cfg, sequential=True)
        cin = stage.width
    return x


def stem(m: Scope, x: Tensor, cfg: RegNetConfig) -> Tensor:
    """``SimpleStemIN``: 3x3/2 conv-BN-ReLU."""
    return m.conv_norm_act(x, cfg.stem_width, 3, act="relu", stride=2)


def forward(m: Scope, cfg: RegNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: ``stem`` (stride 2), every block ``trunk_output.block{i}.block{i}-{j}``, every
    stage ``trunk_output.block{i}`` (strides 4, 8, 16, 32) and ``trunk_output``. No randomness.
    """
    y = m.block("stem", stem, x, cfg)
    y = m.block("trunk_output", trunk, y, cfg, sequential=True)
    y = m.op("avgpool", L.adaptive_avg_pool2d, y, 1, tap=False).flatten(1)
    return m.linear("fc", y, cfg.num_classes, init=("normal", 0.01))


FAMILY = family("regnet", RegNetConfig, forward, paper=PAPER, defaults={"conv": "kaiming_fan_out"})

for _name, (_d, _w0, _wa, _wm, _gw, _se) in DESIGNS.items():
    register(
        f"regnet_{_name}",
        FAMILY,
        params=PARAMS[_name],
        reference=Reference("torchvision", f"regnet_{_name}"),
        depth=_d,
        w_0=_w0,
        w_a=_wa,
        w_m=_wm,
        group_width=_gw,
        se_ratio=_se,
    )
