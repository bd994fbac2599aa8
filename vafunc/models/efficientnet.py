"""EfficientNet B0-B7 and EfficientNetV2 S/M/L in torchvision's layout.

Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"
(arXiv:1905.11946), Table 1 and Sec. 3.3 (compound scaling: ``width_mult``, ``depth_mult``);
Tan & Le 2021, "EfficientNetV2: Smaller Models and Faster Training" (arXiv:2104.00298), Table 4
(V2-S; M and L as in torchvision / the authors' code).

State-dict names are torchvision's: ``features.0`` stem (``Conv2dNormActivation``: ``.0`` conv,
``.1`` BN), ``features.{1..K}.{j}.block.{i}.{0,1}`` (MBConv / Fused-MBConv units, SE at
``block.{i}.fc1/fc2``), ``features.{K+1}`` head conv, ``classifier.1``.

Stochastic depth (Huang et al. 2016) is per sample ("row" mode) with torchvision's linear
schedule: block ``b`` of ``B`` drops its residual branch with probability
``stochastic_depth_prob * b / B``. Its masks and the classifier's dropout mask come from the
explicit ``rng`` key: block ``b`` uses ``fold_in(k_blocks, b)`` and the head ``k_head``, where
``k_blocks, k_head = split(rng)``. BatchNorm: torch defaults for B0-B4, ``eps=1e-3,
momentum=0.01`` for B5-B7, ``eps=1e-3`` for V2 (torchvision's builders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core import layers as L
from vafunc.core import random as vrandom
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Tan & Le 2019, EfficientNet: Rethinking Model Scaling for CNNs, arXiv:1905.11946"
PAPER_V2 = "Tan & Le 2021, EfficientNetV2: Smaller Models and Faster Training, arXiv:2104.00298"

#: Stage tables: (block, expand ratio, kernel, stride, input channels, output channels, layers).
#: "mb" = MBConv with SE (squeeze = input channels / 4), "fused" = Fused-MBConv without SE.
STAGES = {
    "b": (  # EfficientNet-B0, Table 1 (scaled by width_mult / depth_mult for B1-B7)
        ("mb", 1, 3, 1, 32, 16, 1),
        ("mb", 6, 3, 2, 16, 24, 2),
        ("mb", 6, 5, 2, 24, 40, 2),
        ("mb", 6, 3, 2, 40, 80, 3),
        ("mb", 6, 5, 1, 80, 112, 3),
        ("mb", 6, 5, 2, 112, 192, 4),
        ("mb", 6, 3, 1, 192, 320, 1),
    ),
    "v2_s": (
        ("fused", 1, 3, 1, 24, 24, 2),
        ("fused", 4, 3, 2, 24, 48, 4),
        ("fused", 4, 3, 2, 48, 64, 4),
        ("mb", 4, 3, 2, 64, 128, 6),
        ("mb", 6, 3, 1, 128, 160, 9),
        ("mb", 6, 3, 2, 160, 256, 15),
    ),
    "v2_m": (
        ("fused", 1, 3, 1, 24, 24, 3),
        ("fused", 4, 3, 2, 24, 48, 5),
        ("fused", 4, 3, 2, 48, 80, 5),
        ("mb", 4, 3, 2, 80, 160, 7),
        ("mb", 6, 3, 1, 160, 176, 14),
        ("mb", 6, 3, 2, 176, 304, 18),
        ("mb", 6, 3, 1, 304, 512, 5),
    ),
    "v2_l": (
        ("fused", 1, 3, 1, 32, 32, 4),
        ("fused", 4, 3, 2, 32, 64, 7),
        ("fused", 4, 3, 2, 64, 96, 7),
        ("mb", 4, 3, 2, 96, 192, 10),
        ("mb", 6, 3, 1, 192, 224, 19),
        ("mb", 6, 3, 2, 224, 384, 25),
        ("mb", 6, 3, 1, 384, 640, 7),
    ),
}
#: Width of the head conv: 4x the last stage for B0-B7, 1280 for V2.
LAST_CHANNEL = {"b": None, "v2_s": 1280, "v2_m": 1280, "v2_l": 1280}


@dataclass(frozen=True)
class EfficientNetConfig:
    """torchvision ``EfficientNet`` keywords: ``num_classes``, ``dropout``,
    ``stochastic_depth_prob``, and the compound-scaling ``width_mult``/``depth_mult`` (B0-B7
    only; torchvision fixes them per builder). ``arch`` picks the stage table (``"b"``,
    ``"v2_s"``, ``"v2_m"``, ``"v2_l"``); ``norm_eps``/``norm_momentum`` are the builder's
    BatchNorm settings."""

    arch: str = "b"
    width_mult: float = 1.0
    depth_mult: float = 1.0
    num_classes: int = 1000
    dropout: float = 0.2
    stochastic_depth_prob: float = 0.2
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.arch not in STAGES:
            raise ValueError(f"arch must be one of {sorted(STAGES)}, got {self.arch!r}")
        if not self.width_mult > 0 or not self.depth_mult > 0:
            raise ValueError(f"width_mult and depth_mult must be > 0, got {self.width_mult!r}, {self.depth_mult!r}")
        if self.arch != "b" and (self.width_mult != 1.0 or self.depth_mult != 1.0):
            raise ValueError(
                "width_mult/depth_mult scale EfficientNet B0's table (B1-B7); EfficientNetV2 "
                f"variants have their own tables, got width_mult={self.width_mult}, depth_mult={self.depth_mult}"
            )
        check_config(self, rates=("dropout", "stochastic_depth_prob"))


class BlockSpec(NamedTuple):
    kind: str  # "mb" (MBConv with SE) or "fused" (Fused-MBConv)
    cin: int
    cout: int
    expanded: int
    kernel: int
    stride: int
    drop_path: float

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.cin == self.cout


def plan(cfg: EfficientNetConfig) -> tuple[int, tuple, int]:
    """``(stem channels, stages of BlockSpecs, head channels)``; block ``b`` of ``B`` carries
    stochastic-depth rate ``stochastic_depth_prob * b / B``."""
    ch = lambda c: B.make_divisible(c * cfg.width_mult, 8)  # noqa: E731
    rows = []
    for kind, t, k, s, cin, cout, n in STAGES[cfg.arch]:
        if kind == "mb":  # torchvision's MBConvConfig rounds channels and scales depth
            cin, cout, n = ch(cin), ch(cout), int(math.ceil(n * cfg.depth_mult))
        rows.append((kind, t, k, s, cin, cout, n))
    total = sum(r[-1] for r in rows)
    stages, b = [], 0
    for kind, t, k, stride, cin, cout, n in rows:
        stage = []
        for j in range(n):
            c_in, s = (cin, stride) if j == 0 else (cout, 1)
            stage.append(
                BlockSpec(kind, c_in, cout, B.make_divisible(c_in * t, 8), k, s, cfg.stochastic_depth_prob * b / total)
            )
            b += 1
        stages.append(tuple(stage))
    last_in = rows[-1][5]
    return rows[0][4], tuple(stages), LAST_CHANNEL[cfg.arch] or 4 * last_in


def block(m: Scope, x: Tensor, b: BlockSpec) -> Tensor:
    """One MBConv (SE squeeze: input channels / 4) or Fused-MBConv, SiLU, torchvision's layout;
    its stochastic-depth key is the scope's."""
    if b.kind == "fused":
        return B.fused_mbconv(
            m,
            x,
            b.cout,
            cin=b.cin,
            expanded=b.expanded,
            kernel=b.kernel,
            stride=b.stride,
            act="silu",
            drop_path=b.drop_path,
            names=B.TORCHVISION,
        )
    return B.mbconv(
        m,
        x,
        b.cout,
        cin=b.cin,
        expanded=b.expanded,
        kernel=b.kernel,
        stride=b.stride,
        act="silu",
        se=max(1, b.cin // 4),
        se_act="silu",
        drop_path=b.drop_path,
        names=B.TORCHVISION,
    )


#: torchvision's ``min_size`` for EfficientNetV2.
V2_MIN_SIZE = 33


def forward(m: Scope, cfg: EfficientNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (torchvision module paths): ``features.0`` (stem, stride 2), every block
    ``features.{i}.{j}``, every stage ``features.{i}``, and the head conv ``features.{K+1}``.
    """
    if m.initializing and cfg.arch != "b" and min(x.shape[-2:]) < V2_MIN_SIZE:  # the size probe: min_size
        raise ValueError(f"EfficientNetV2 needs inputs of at least {V2_MIN_SIZE}x{V2_MIN_SIZE}")
    stem, stages, last = plan(cfg)
    k_blocks, k_head = (None, None) if m.rng is None else vrandom.split(m.rng).unbind(-2)
    y = m.block("features", features, x, stem, stages, last, tap=False, rng=k_blocks)
    y = torch.flatten(m.op("avgpool", L.adaptive_avg_pool2d, y, 1, tap=False), 1)
    return m.block("classifier", B.classifier, y, cfg.num_classes, cfg.dropout, tap=False, rng=k_head)


def features(m: Scope, x: Tensor, stem: int, stages: tuple, last: int) -> Tensor:
    """torchvision's ``features``: the stem ``0``, the stages ``1..K`` and the head conv ``K+1``."""
    y = m.block("0", Scope.conv_norm_act, x, stem, 3, stride=2, act="silu")
    y = B.stages(m, y, stages, block, start=1)
    return m.block(str(len(stages) + 1), Scope.conv_norm_act, y, last, 1, act="silu")


#: torchvision's init: convs kaiming_normal_(fan_out), classifier uniform in +-1/sqrt(classes);
#: BatchNorm settings per builder.
FAMILY = family(
    "efficientnet",
    EfficientNetConfig,
    forward,
    paper=PAPER,
    defaults=lambda cfg: {"linear": "uniform_range", "eps": cfg.norm_eps, "momentum": cfg.norm_momentum},
)

# torchvision's builders: (name, width, depth, dropout, BN eps, BN momentum, params)
for _name, _w, _d, _drop, _eps, _mom, _n in [
    ("efficientnet_b0", 1.0, 1.0, 0.2, 1e-5, 0.1, 5288548),
    ("efficientnet_b1", 1.0, 1.1, 0.2, 1e-5, 0.1, 7794184),
    ("efficientnet_b2", 1.1, 1.2, 0.3, 1e-5, 0.1, 9109994),
    ("efficientnet_b3", 1.2, 1.4, 0.3, 1e-5, 0.1, 12233232),
    ("efficientnet_b4", 1.4, 1.8, 0.4, 1e-5, 0.1, 19341616),
    ("efficientnet_b5", 1.6, 2.2, 0.4, 1e-3, 0.01, 30389784),
    ("efficientnet_b6", 1.8, 2.6, 0.5, 1e-3, 0.01, 43040704),
    ("efficientnet_b7", 2.0, 3.1, 0.5, 1e-3, 0.01, 66347960),
]:
    register(
        _name,
        FAMILY,
        params=_n,
        reference=Reference("torchvision", _name),
        arch="b",
        width_mult=_w,
        depth_mult=_d,
        dropout=_drop,
        norm_eps=_eps,
        norm_momentum=_mom,
    )

for _name, _arch, _drop, _n in [
    ("efficientnet_v2_s", "v2_s", 0.2, 21458488),
    ("efficientnet_v2_m", "v2_m", 0.3, 54139356),
    ("efficientnet_v2_l", "v2_l", 0.4, 118515272),
]:
    register(
        _name,
        FAMILY,
        params=_n,
        reference=Reference("torchvision", _name),
        paper=PAPER_V2,
        arch=_arch,
        dropout=_drop,
        norm_eps=1e-3,
        norm_momentum=0.1,
    )
