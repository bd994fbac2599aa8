"""AlexNet in torchvision's layout (the single-tower "one weird trick" variant).

Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional Neural Networks"
(NeurIPS), Section 3.5 / Figure 2; torchvision follows the channel widths of Krizhevsky 2014,
"One weird trick for parallelizing convolutional neural networks" (arXiv:1404.5997):
64-192-384-256-256 instead of the paper's two-GPU 96-256-384-384-256, and no local response
normalisation.

State-dict names are torchvision's: ``features.{0,3,6,8,10}`` (convolutions; the other indices
are ReLU / max-pool slots) and ``classifier.{1,4,6}`` (linear layers; 0 and 3 are dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Krizhevsky et al. 2012, ImageNet Classification with Deep Convolutional Neural Networks (NeurIPS)"


class Conv(NamedTuple):
    out: int
    kernel: int
    stride: int
    padding: int


#: ``features``: one entry per ``nn.Sequential`` slot, so the index is the state_dict name.
FEATURES = (
    Conv(64, 11, 4, 2),
    "relu",
    "pool",
    Conv(192, 5, 1, 2),
    "relu",
    "pool",
    Conv(384, 3, 1, 1),
    "relu",
    Conv(256, 3, 1, 1),
    "relu",
    Conv(256, 3, 1, 1),
    "relu",
    "pool",
)
POOL = (3, 2)  # overlapping max-pooling, kernel 3 stride 2 (paper Section 3.4)
POOLED = 6  # adaptive average pool to 6x6 before the classifier
HIDDEN = 4096


@dataclass(frozen=True)
class AlexNetConfig:
    """torchvision ``AlexNet`` keywords."""

    num_classes: int = 1000
    dropout: float = 0.5
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_config(self, rates=("dropout",))


def features(m: Scope, x: Tensor) -> Tensor:
    """The five convolutional layers (paper Figure 2): ``[N, C, H, W] -> [N, 256, h, w]`` with
    ``h ~ H / 32`` (a stride-4 convolution, then three stride-2 pools); ``h = 1`` at ``H = 63``.

    Feature names: ``features.0`` .. ``features.12`` (conv, ReLU and pool outputs).
    """
    for i, layer in enumerate(FEATURES):
        if isinstance(layer, Conv):
            x = m.tap(
                str(i),
                m.conv(str(i), x, layer.out, layer.kernel, stride=layer.stride, padding=layer.padding, bias=True),
            )
        elif layer == "relu":  # in place (as torchvision) unless the conv output was recorded as a feature
            x = m.op(str(i), L.relu_ if m.taps is None else L.relu, x)
        else:
            x = m.op(str(i), L.max_pool2d, x, *POOL)
    return x


def classifier(m: Scope, x: Tensor, cfg: AlexNetConfig) -> Tensor:
    """Three fully connected layers with dropout before the first two (paper Section 4.2):
    ``[N, 256 * 6 * 6] -> [N, num_classes]``; dropout keys ``m.key(0)`` and ``m.key(1)``."""
    x = m.dropout(x, cfg.dropout, m.key(0), name="0")
    x = m.op("2", L.relu_, m.linear("1", x, HIDDEN), tap=False)  # a fresh linear output: in place is safe
    x = m.dropout(x, cfg.dropout, m.key(1), name="3")
    x = m.op("5", L.relu_, m.linear("4", x, HIDDEN), tap=False)
    return m.linear("6", x, cfg.num_classes)


def forward(m: Scope, cfg: AlexNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``; any size >= 63x63 (adaptive 6x6 pooling).
    AlexNet has no BatchNorm: the state is empty."""
    y = m.block("features", features, x, tap=False)
    y = m.op("avgpool", L.adaptive_avg_pool2d, y, POOLED, tap=False).flatten(1)
    return m.block("classifier", classifier, y, cfg, rng=m.rng, tap=False)


#: torch's default init everywhere (torchvision's AlexNet has no init of its own).
FAMILY = family(
    "alexnet",
    AlexNetConfig,
    forward,
    paper=PAPER,
    defaults={"conv": "kaiming_fan_in_uniform", "linear": "torch_default"},
)

register(
    "alexnet",
    FAMILY,
    params=61100840,
    reference=Reference("torchvision", "alexnet"),
    notes="torchvision's single-tower variant (arXiv:1404.5997 widths), no LRN",
)
