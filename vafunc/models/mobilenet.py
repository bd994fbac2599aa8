"""MobileNet V1, V2 and V3.

* V1: Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
  Applications" (arXiv:1704.04861), Table 1. torchvision has no V1; names, layout and init follow
  timm's ``mobilenetv1_100`` (the most used public checkpoint): ``conv_stem``, ``bn1``,
  ``blocks.{i}.{j}.conv_dw/bn1/conv_pw/bn2``, ``classifier``. ReLU6 everywhere, no shortcuts.
* V2: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
  (arXiv:1801.04381), Table 2. torchvision names: ``features.{0..18}``, blocks at
  ``features.{n}.conv.*`` (see :data:`vafunc.core.blocks.MOBILENET_V2`), ``classifier.1``.
* V3: Howard et al. 2019, "Searching for MobileNetV3" (arXiv:1905.02244), Tables 1-2.
  torchvision names: ``features.{n}.block.{i}.{0,1}``, SE at ``block.{i}.fc1/fc2``,
  ``classifier.0`` and ``classifier.3``. BatchNorm ``eps=1e-3, momentum=0.01``.

All blocks are the shared ones of :mod:`vafunc.core.blocks` (depthwise separable, MBConv) over the
kit's conv-BN-act and SE; the per-family differences are data (stage tables, layouts, norms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER_V1 = "Howard et al. 2017, MobileNets: Efficient CNNs for Mobile Vision Applications, arXiv:1704.04861"
PAPER_V2 = "Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks, arXiv:1801.04381"
PAPER_V3 = "Howard et al. 2019, Searching for MobileNetV3, arXiv:1905.02244"


def _check_common(
    cfg: MobileNetV1Config | MobileNetV2Config | MobileNetV3Config, dropout_field: str = "dropout"
) -> None:
    check_config(cfg, rates=(dropout_field,))
    if not cfg.width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {cfg.width_mult!r}")


# =========================================================================== MobileNetV1

#: Table 1 of the paper, as timm's arch def: (blocks, output channels, stride of the first).
V1_STAGES = ((1, 64, 1), (2, 128, 2), (2, 256, 2), (6, 512, 2), (2, 1024, 2))


@dataclass(frozen=True)
class MobileNetV1Config:
    """timm ``mobilenetv1_*`` keywords: ``num_classes``, ``drop_rate`` (dropout before the
    classifier), ``width_mult`` (timm's ``channel_multiplier``: 1.0 is ``mobilenetv1_100``,
    1.25 ``mobilenetv1_125``), ``in_channels`` (timm's ``in_chans``)."""

    num_classes: int = 1000
    width_mult: float = 1.0
    drop_rate: float = 0.0
    in_channels: int = 3

    def __post_init__(self) -> None:
        _check_common(self, "drop_rate")


class V1Block(NamedTuple):
    cout: int
    stride: int
    cin: int


def plan_v1(cfg: MobileNetV1Config) -> tuple[int, tuple]:
    """``(stem channels, stages of V1Blocks)``; channels rounded like timm."""
    ch = lambda c: B.make_divisible(c * cfg.width_mult, 8)  # noqa: E731
    stages, cin = [], ch(32)
    for n, c, stride in V1_STAGES:
        stages.append(tuple(V1Block(ch(c), stride if j == 0 else 1, cin if j == 0 else ch(c)) for j in range(n)))
        cin = ch(c)
    return ch(32), tuple(stages)


def block_v1(m: Scope, x: Tensor, b: V1Block) -> Tensor:
    return B.depthwise_separable(m, x, b.cout, cin=b.cin, stride=b.stride, act="relu6", names=B.TIMM_DS)


def forward_v1(m: Scope, cfg: MobileNetV1Config, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: ``bn1`` (stem, stride 2), every block ``blocks.{i}.{j}`` and every stage
    ``blocks.0`` .. ``blocks.4`` (strides 2, 4, 8, 16, 32) -- timm's module paths.
    """
    stem, stages = plan_v1(cfg)
    y = m.conv_norm_act(x, stem, 3, conv="conv_stem", norm="bn1", act="relu6", stride=2)
    y = m.tap("bn1", y)
    y = m.block("blocks", B.stages, y, stages, block_v1, tap=False)
    return m.head(y, cfg.num_classes, name="classifier", rate=cfg.drop_rate, rng=m.rng)


#: timm's layout: each BatchNorm and its activation are one module (``BatchNormAct2d``)
FAMILY_V1 = family(
    "mobilenet_v1",
    MobileNetV1Config,
    forward_v1,
    paper=PAPER_V1,
    defaults={"conv": "goog", "linear": "uniform_range", "norm_act": True},
)


# =========================================================================== MobileNetV2

#: Table 2 of the paper: (expansion t, output channels c, repeats n, first stride s).
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


@dataclass(frozen=True)
class MobileNetV2Config:
    """torchvision ``MobileNetV2`` keywords (``block``/``norm_layer`` aside);
    ``inverted_residual_setting=None`` means the paper's Table 2 (:data:`V2_SETTING`)."""

    num_classes: int = 1000
    width_mult: float = 1.0
    inverted_residual_setting: tuple | None = None
    round_nearest: int = 8
    dropout: float = 0.2
    in_channels: int = 3

    def __post_init__(self) -> None:
        _check_common(self)
        rows = V2_SETTING if self.inverted_residual_setting is None else self.inverted_residual_setting
        rows = tuple(tuple(r) for r in rows)
        if not rows or any(len(r) != 4 for r in rows):
            raise ValueError(f"inverted_residual_setting must be non-empty rows of 4 (t, c, n, s), got {rows}")
        for t, c, n, s in rows:
            if s not in (1, 2) or int(n) < 1 or int(c) < 1 or not t > 0:
                raise ValueError(
                    f"bad inverted_residual_setting row {(t, c, n, s)}: need t > 0, c >= 1, n >= 1, s in (1, 2)"
                )
        object.__setattr__(self, "inverted_residual_setting", rows)
        if not isinstance(self.round_nearest, int) or self.round_nearest < 1:
            raise ValueError(f"round_nearest must be a positive int, got {self.round_nearest!r}")


class V2Block(NamedTuple):
    cout: int
    expanded: int
    expand: bool
    stride: int
    cin: int


def plan_v2(cfg: MobileNetV2Config) -> tuple[int, tuple, int]:
    """``(stem channels, V2Blocks, head channels)``: ``features.0``, ``features.1..n``,
    ``features.n+1``."""
    rnd = cfg.round_nearest
    cin = B.make_divisible(32 * cfg.width_mult, rnd)
    stem, blocks = cin, []
    for t, c, n, s in cfg.inverted_residual_setting:
        cout = B.make_divisible(c * cfg.width_mult, rnd)
        for j in range(int(n)):
            blocks.append(V2Block(cout, int(round(cin * t)), t != 1, s if j == 0 else 1, cin))
            cin = cout
    return stem, tuple(blocks), B.make_divisible(1280 * max(1.0, cfg.width_mult), rnd)


def block_v2(m: Scope, x: Tensor, b: V2Block) -> Tensor:
    return B.mbconv(
        m,
        x,
        b.cout,
        cin=b.cin,
        expanded=b.expanded,
        expand=b.expand,
        kernel=3,
        stride=b.stride,
        act="relu6",
        names=B.MOBILENET_V2,
    )


def forward_v2(m: Scope, cfg: MobileNetV2Config, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: ``features.0`` .. ``features.18`` (torchvision's module paths; the stem is
    stride 2, the last block of each stride level ends a stage).
    """
    stem, blocks, last = plan_v2(cfg)
    y = m.block("features", features, x, stem, blocks, last, block_v2, "relu6", tap=False)
    y = L.global_avg_pool(y)  # functional in torchvision's MobileNetV2
    return m.block("classifier", B.classifier, y, cfg.num_classes, cfg.dropout, tap=False, rng=m.rng)


def features(
    m: Scope,
    x: Tensor,
    stem: int,
    blocks: tuple,
    last: int,
    block: Callable[..., Tensor],
    act: str,
    keep: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """torchvision's ``features`` of MobileNetV2/V3: the stem ``0``, the blocks ``1..n`` and the
    head conv ``n+1``. ``keep=i``: also return the output of ``features.i`` (a block), as
    ``(output, kept)`` (the segmentation models' low-level features)."""
    # the stem's output is passed on, not held here: the first block frees it, as in torchvision
    head = blocks if keep is None else blocks[:keep]
    y = B.sequence(m, m.block("0", Scope.conv_norm_act, x, stem, 3, stride=2, act=act), head, block, start=1)
    if keep is not None:
        kept, y = y, B.sequence(m, y, blocks[keep:], block, start=keep + 1, index=keep)
    y = m.block(str(len(blocks) + 1), Scope.conv_norm_act, y, last, 1, act=act)
    return y if keep is None else (y, kept)


FAMILY_V2 = family("mobilenet_v2", MobileNetV2Config, forward_v2, paper=PAPER_V2, defaults={"linear": ("normal", 0.01)})


# =========================================================================== MobileNetV3

#: Tables 1 (large) and 2 (small): (input, kernel, expanded, output, SE, activation, stride).
#: Rows from index ``c4`` on form the last stage ("C4"): ``dilated`` gives them dilation 2
#: instead of the stride, ``reduced_tail`` halves their output (and, after the first, their
#: expanded) channels -- torchvision's segmentation-backbone options.
V3_ARCH = {
    "large": dict(
        rows=(
            (16, 3, 16, 16, False, "relu", 1),
            (16, 3, 64, 24, False, "relu", 2),
            (24, 3, 72, 24, False, "relu", 1),
            (24, 5, 72, 40, True, "relu", 2),
            (40, 5, 120, 40, True, "relu", 1),
            (40, 5, 120, 40, True, "relu", 1),
            (40, 3, 240, 80, False, "hardswish", 2),
            (80, 3, 200, 80, False, "hardswish", 1),
            (80, 3, 184, 80, False, "hardswish", 1),
            (80, 3, 184, 80, False, "hardswish", 1),
            (80, 3, 480, 112, True, "hardswish", 1),
            (112, 3, 672, 112, True, "hardswish", 1),
            (112, 5, 672, 160, True, "hardswish", 2),
            (160, 5, 960, 160, True, "hardswish", 1),
            (160, 5, 960, 160, True, "hardswish", 1),
        ),
        c4=12,
        last_channel=1280,
    ),
    "small": dict(
        rows=(
            (16, 3, 16, 16, True, "relu", 2),
            (16, 3, 72, 24, False, "relu", 2),
            (24, 3, 88, 24, False, "relu", 1),
            (24, 5, 96, 40, True, "hardswish", 2),
            (40, 5, 240, 40, True, "hardswish", 1),
            (40, 5, 240, 40, True, "hardswish", 1),
            (40, 5, 120, 48, True, "hardswish", 1),
            (48, 5, 144, 48, True, "hardswish", 1),
            (48, 5, 288, 96, True, "hardswish", 2),
            (96, 5, 576, 96, True, "hardswish", 1),
            (96, 5, 576, 96, True, "hardswish", 1),
        ),
        c4=8,
        last_channel=1024,
    ),
}


@dataclass(frozen=True)
class MobileNetV3Config:
    """torchvision ``mobilenet_v3_large/small`` keywords: ``num_classes``, ``dropout``,
    ``width_mult``, ``reduced_tail``, ``dilated``; ``arch`` is ``"large"`` or ``"small"``."""

    arch: str = "large"
    num_classes: int = 1000
    width_mult: float = 1.0
    reduced_tail: bool = False
    dilated: bool = False
    dropout: float = 0.2
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.arch not in V3_ARCH:
            raise ValueError(f"arch must be one of {sorted(V3_ARCH)}, got {self.arch!r}")
        _check_common(self)


class V3Block(NamedTuple):
    cout: int
    expanded: int
    kernel: int
    stride: int
    dilation: int
    act: str
    se: int | None  # squeeze channels
    cin: int


def plan_v3(cfg: MobileNetV3Config) -> tuple[int, tuple, int, int]:
    """``(stem channels, V3Blocks, head channels, hidden)``: ``features.0``,
    ``features.1..n``, ``features.n+1``, and the width of the first classifier layer."""
    arch = V3_ARCH[cfg.arch]
    ch = lambda c: B.make_divisible(c * cfg.width_mult, 8)  # noqa: E731
    div, dil = (2 if cfg.reduced_tail else 1), (2 if cfg.dilated else 1)
    blocks = []
    for i, (cin, k, exp, out, se, act, stride) in enumerate(arch["rows"]):
        tail, after = i >= arch["c4"], i > arch["c4"]
        exp, out = ch(exp // div if after else exp), ch(out // div if tail else out)
        blocks.append(
            V3Block(
                out,
                exp,
                k,
                stride,
                dil if tail else 1,
                act,
                B.make_divisible(exp // 4, 8) if se else None,
                blocks[-1].cout if blocks else ch(cin),
            )
        )
    stem = ch(arch["rows"][0][0])
    return stem, tuple(blocks), 6 * out, ch(arch["last_channel"] // div)


def block_v3(m: Scope, x: Tensor, b: V3Block) -> Tensor:
    return B.mbconv(
        m,
        x,
        b.cout,
        cin=b.cin,
        expanded=b.expanded,
        kernel=b.kernel,
        stride=b.stride,
        dilation=b.dilation,
        act=b.act,
        se=b.se,
        se_gate="hardsigmoid",
        names=B.TORCHVISION,
    )


def forward_v3(m: Scope, cfg: MobileNetV3Config, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: ``features.0`` .. ``features.{n+1}`` (torchvision's module paths).
    """
    stem, blocks, head, hidden = plan_v3(cfg)
    y = m.block("features", features, x, stem, blocks, head, block_v3, "hardswish", tap=False)
    y = torch.flatten(m.op("avgpool", L.adaptive_avg_pool2d, y, 1, tap=False), 1)
    return m.block("classifier", classifier_v3, y, hidden, cfg.num_classes, cfg.dropout, tap=False, rng=m.rng)


def classifier_v3(m: Scope, x: Tensor, hidden: int, num_classes: int, rate: float) -> Tensor:
    """``Sequential(Linear, Hardswish, Dropout, Linear)``; the dropout keyed by the scope's key."""
    y = m.op("1", L.hardswish_, m.linear("0", x, hidden), tap=False)
    return m.linear("3", m.dropout(y, rate, m.rng, name="2"), num_classes)


#: torchvision's MobileNetV3: BatchNorm eps 1e-3, momentum 0.01; classifier N(0, 0.01).
FAMILY_V3 = family(
    "mobilenet_v3",
    MobileNetV3Config,
    forward_v3,
    paper=PAPER_V3,
    defaults={"linear": ("normal", 0.01), "eps": 1e-3, "momentum": 0.01},
)


# =========================================================================== registry

register(
    "mobilenet_v1",
    FAMILY_V1,
    params=4231976,
    reference=Reference("timm", "mobilenetv1_100"),
    notes="timm mobilenetv1_100 layout and init (torchvision has no MobileNetV1)",
)
register("mobilenet_v2", FAMILY_V2, params=3504872, reference=Reference("torchvision", "mobilenet_v2"))
register(
    "mobilenet_v3_large",
    FAMILY_V3,
    params=5483032,
    reference=Reference("torchvision", "mobilenet_v3_large"),
    arch="large",
)
register(
    "mobilenet_v3_small",
    FAMILY_V3,
    params=2542856,
    reference=Reference("torchvision", "mobilenet_v3_small"),
    arch="small",
)
