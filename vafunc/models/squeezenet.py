"""SqueezeNet 1.0 and 1.1 in torchvision's layout.

Iandola et al. 2016, "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB
model size" (arXiv:1602.07360), Table 1 (1.0) and the SqueezeNet 1.1 variant of the authors'
repository (3x3/64 stem, pools moved earlier: 2.4x less computation, same accuracy).

The building block is the Fire module (Sec. 3.2): a 1x1 *squeeze* convolution to few channels,
then two parallel *expand* convolutions (1x1 and 3x3), concatenated. There is no BatchNorm and
no fully connected layer; a 1x1 convolution to the classes, ReLU and global average pooling
form the head.

State-dict names are torchvision's: ``features.{i}`` (``.squeeze``, ``.expand1x1``,
``.expand3x3`` inside a Fire module) and ``classifier.1`` (the final conv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Iandola et al. 2016, SqueezeNet: AlexNet-level accuracy with 50x fewer parameters, arXiv:1602.07360"

#: The ``features`` sequence per version: ``("conv", out, kernel)``, ``("pool",)`` (3x3/2 max pool,
#: ceil mode), ``("fire", squeeze, expand1x1, expand3x3)``. Index = position in torchvision's
#: ``nn.Sequential`` (the stem's ReLU is index 1).
FEATURES = {
    "1_0": (
        ("conv", 96, 7),
        ("relu",),
        ("pool",),
        ("fire", 16, 64, 64),
        ("fire", 16, 64, 64),
        ("fire", 32, 128, 128),
        ("pool",),
        ("fire", 32, 128, 128),
        ("fire", 48, 192, 192),
        ("fire", 48, 192, 192),
        ("fire", 64, 256, 256),
        ("pool",),
        ("fire", 64, 256, 256),
    ),
    "1_1": (
        ("conv", 64, 3),
        ("relu",),
        ("pool",),
        ("fire", 16, 64, 64),
        ("fire", 16, 64, 64),
        ("pool",),
        ("fire", 32, 128, 128),
        ("fire", 32, 128, 128),
        ("pool",),
        ("fire", 48, 192, 192),
        ("fire", 48, 192, 192),
        ("fire", 64, 256, 256),
        ("fire", 64, 256, 256),
    ),
}


@dataclass(frozen=True)
class SqueezeNetConfig:
    """torchvision ``SqueezeNet`` keywords: ``version`` (``"1_0"`` or ``"1_1"``), ``num_classes``
    and ``dropout`` (before the final conv; train mode only, needs ``rng``)."""

    version: str = "1_0"
    num_classes: int = 1000
    dropout: float = 0.5
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.version not in FEATURES:
            raise ValueError(f"version must be one of {sorted(FEATURES)}, got {self.version!r}")
        check_config(self, rates=("dropout",))


def fire(m: Scope, x: Tensor, squeeze: int, e1: int, e3: int) -> Tensor:
    """Fire module (Sec. 3.2, Fig. 1): ``[N, C, H, W] -> [N, e1 + e3, H, W]``."""
    s = m.op("squeeze_activation", L.relu_, m.conv("squeeze", x, squeeze, 1, bias=True), tap=False)
    return torch.cat(
        [
            m.op("expand1x1_activation", L.relu_, m.conv("expand1x1", s, e1, 1, bias=True), tap=False),
            m.op("expand3x3_activation", L.relu_, m.conv("expand3x3", s, e3, 3, bias=True), tap=False),
        ],
        1,
    )


def features(m: Scope, x: Tensor, cfg: SqueezeNetConfig) -> Tensor:
    for i, (kind, *args) in enumerate(FEATURES[cfg.version]):
        if kind == "fire":
            x = m.block(str(i), fire, x, *args)
        elif kind == "conv":
            x = m.tap(str(i), m.conv(str(i), x, args[0], args[1], stride=2, padding=0, bias=True))
        elif kind == "relu":  # the stem's ReLU: in place unless its input is a recorded feature
            x = m.op(str(i), L.relu if m.taps else L.relu_, x)
        else:
            x = m.op(str(i), L.max_pool2d, x, 3, 2, ceil_mode=True)
    return x


def classifier(m: Scope, x: Tensor, cfg: SqueezeNetConfig) -> Tensor:
    """Dropout (key ``m.key(0)``), the final 1x1 conv to the classes, ReLU, global average pool:
    ``[N, 512, h, w] -> [N, num_classes, 1, 1]``."""
    x = m.dropout(x, cfg.dropout, m.key(0), name="0")
    x = m.op("2", L.relu_, m.conv("1", x, cfg.num_classes, 1, bias=True, init=("normal", 0.01)), tap=False)
    return m.op("3", L.adaptive_avg_pool2d, x, 1, tap=False)


def forward(m: Scope, cfg: SqueezeNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: every entry of ``features`` (``features.0`` .. ``features.12``: the stem conv,
    its ReLU, the pools and every Fire module; ``features.12`` is the final map). Dropout key:
    ``fold_in(rng, 0)``.
    """
    y = m.block("features", features, x, cfg, tap=False)
    return m.block("classifier", classifier, y, cfg, rng=m.rng, tap=False).flatten(1)


FAMILY = family("squeezenet", SqueezeNetConfig, forward, paper=PAPER, defaults={"conv": "kaiming_uniform"})

for _version, _n in [("1_0", 1248424), ("1_1", 1235496)]:
    register(
        f"squeezenet{_version}",
        FAMILY,
        params=_n,
        reference=Reference("torchvision", f"squeezenet{_version}"),
        version=_version,
    )
