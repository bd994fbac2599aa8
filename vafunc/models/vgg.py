"""VGG-11/13/16/19, with and without BatchNorm, in torchvision's layout.

Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(arXiv:1409.1556), Table 1 (configurations A, B, D, E). The ``_bn`` variants insert BatchNorm
after every convolution (not in the paper; torchvision's addition).

State-dict names are torchvision's: ``features.{i}`` (one index per conv / BN / ReLU / max-pool
slot of the ``nn.Sequential``; only convs and BNs hold tensors) and ``classifier.{0,3,6}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Simonyan & Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image Recognition, arXiv:1409.1556"

#: Table 1 of the paper: 3x3 conv widths, "M" = 2x2 max-pool with stride 2.
CONFIGURATIONS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
DEPTH = {"A": 11, "B": 13, "D": 16, "E": 19}
POOLED = 7  # adaptive average pool to 7x7 before the classifier (224 / 32)
HIDDEN = 4096


@dataclass(frozen=True)
class VGGConfig:
    """torchvision ``VGG`` keywords plus the paper's configuration letter and ``batch_norm``."""

    configuration: str = "D"
    batch_norm: bool = False
    num_classes: int = 1000
    dropout: float = 0.5
    init_weights: bool = True
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"configuration must be one of {sorted(CONFIGURATIONS)}, got {self.configuration!r}")
        check_config(self, rates=("dropout",))


class Layer(NamedTuple):
    kind: str  # "conv", "bn", "relu" or "pool"
    index: int  # slot in torchvision's ``features`` Sequential
    cout: int  # the channels of the slot's output


def plan(cfg: VGGConfig) -> tuple[Layer, ...]:
    """The ``features`` Sequential of a configuration, one :class:`Layer` per slot."""
    layers, c = [], cfg.in_channels
    for v in CONFIGURATIONS[cfg.configuration]:
        if v == "M":
            layers.append(Layer("pool", len(layers), c))
            continue
        c = v
        for kind in ("conv", "bn", "relu") if cfg.batch_norm else ("conv", "relu"):
            layers.append(Layer(kind, len(layers), c))
    return tuple(layers)


# --------------------------------------------------------------------------- the network


def features(m: Scope, x: Tensor, cfg: VGGConfig) -> Tensor:
    """The convolutional stack (paper Section 2.1): 3x3 convs with padding 1, ReLU, five 2x2
    max-pools. ``[N, C, H, W] -> [N, 512, H / 32, W / 32]`` (floor at each pool).

    Feature names: ``features.{i}`` for every slot.
    """
    for layer in plan(cfg):
        name = str(layer.index)
        if layer.kind == "conv":
            x = m.tap(name, m.conv(name, x, layer.cout, 3, padding=1, bias=True))
        elif layer.kind == "bn":
            x = m.tap(name, m.batch_norm(name, x))
        elif layer.kind == "relu":  # in place unless the previous output was recorded as a feature
            x = m.op(name, L.relu_ if m.taps is None else L.relu, x)
        else:
            x = m.op(name, L.max_pool2d, x, 2, 2)
    return x


def classifier(m: Scope, x: Tensor, cfg: VGGConfig) -> Tensor:
    """Three fully connected layers, dropout after the first two (paper Section 3.1):
    ``[N, 512 * 7 * 7] -> [N, num_classes]``; dropout keys ``m.key(0)`` and ``m.key(1)``."""
    x = m.op("1", L.relu_, m.linear("0", x, HIDDEN), tap=False)  # fresh outputs: in place
    x = m.dropout(x, cfg.dropout, m.key(0), name="2")
    x = m.op("4", L.relu_, m.linear("3", x, HIDDEN), tap=False)
    x = m.dropout(x, cfg.dropout, m.key(1), name="5")
    return m.linear("6", x, cfg.num_classes)


def forward(m: Scope, cfg: VGGConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``; any size >= 32x32 (the 7x7 adaptive pool
    replaces the paper's fixed 224 input; below 32 the fifth pool has nothing left)."""
    y = m.block("features", features, x, cfg, tap=False)
    y = m.op("avgpool", L.adaptive_avg_pool2d, y, POOLED, tap=False).flatten(1)
    return m.block("classifier", classifier, y, cfg, rng=m.rng, tap=False)


def defaults(cfg: VGGConfig) -> dict:
    """torchvision's VGG init: conv kaiming-normal (fan_out, ReLU gain) with zero bias, BN 1/0,
    linear normal(0, 0.01) with zero bias. ``init_weights=False``: torch's default init."""
    if cfg.init_weights:
        return {"conv": "kaiming_fan_out", "linear": ("normal", 0.01)}
    return {"conv": "kaiming_fan_in_uniform", "linear": "torch_default"}


FAMILY = family("vgg", VGGConfig, forward, paper=PAPER, defaults=defaults)

_PARAMS = {
    ("A", False): 132863336,
    ("A", True): 132868840,
    ("B", False): 133047848,
    ("B", True): 133053736,
    ("D", False): 138357544,
    ("D", True): 138365992,
    ("E", False): 143667240,
    ("E", True): 143678248,
}

for (_conf, _bn), _n in _PARAMS.items():
    _name = f"vgg{DEPTH[_conf]}" + ("_bn" if _bn else "")
    register(
        _name,
        FAMILY,
        params=_n,
        reference=Reference("torchvision", _name),
        notes=f"configuration {_conf} of Table 1" + (", BatchNorm after every conv" if _bn else ""),
        configuration=_conf,
        batch_norm=_bn,
    )
