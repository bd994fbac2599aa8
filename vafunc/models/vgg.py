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

from .. import layers as L
from .. import random as vrandom
from ..registry import Family, Reference, check_config, register

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

    def __post_init__(self):
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"configuration must be one of {sorted(CONFIGURATIONS)}, got {self.configuration!r}")
        check_config(self, rates=("dropout",))


class Layer(NamedTuple):
    kind: str  # "conv", "bn", "relu" or "pool"
    index: int  # slot in torchvision's ``features`` Sequential
    cin: int
    cout: int


def plan(cfg: VGGConfig) -> tuple[Layer, ...]:
    """The ``features`` Sequential of a configuration, one :class:`Layer` per slot."""
    layers, cin = [], cfg.in_channels
    for v in CONFIGURATIONS[cfg.configuration]:
        if v == "M":
            layers.append(Layer("pool", len(layers), cin, cin))
            continue
        kinds = ("conv", "bn", "relu") if cfg.batch_norm else ("conv", "relu")
        for kind in kinds:
            layers.append(Layer(kind, len(layers), cin if kind == "conv" else v, v))
        cin = v
    return tuple(layers)


# --------------------------------------------------------------------------- init / apply


def init(cfg: VGGConfig, ini) -> dict:
    """torchvision's VGG init: conv kaiming-normal (fan_out, ReLU gain) with zero bias, BN 1/0,
    linear normal(0, 0.01) with zero bias. ``init_weights=False``: torch's default init."""
    conv_scheme = "kaiming_fan_out" if cfg.init_weights else "kaiming_fan_in_uniform"

    def linear(fin, fout):
        if cfg.init_weights:
            return ini.linear(fin, fout, scheme="normal", std=0.01)
        return ini.linear(fin, fout)

    features = {}
    for layer in plan(cfg):
        if layer.kind == "conv":
            features[str(layer.index)] = ini.conv(layer.cin, layer.cout, 3, bias=True, scheme=conv_scheme)
        elif layer.kind == "bn":
            features[str(layer.index)] = ini.batch_norm(layer.cout)
    width = CONFIGURATIONS[cfg.configuration][-2]
    return {
        "features": features,
        "classifier": {
            "0": linear(width * POOLED * POOLED, HIDDEN),
            "3": linear(HIDDEN, HIDDEN),
            "6": linear(HIDDEN, cfg.num_classes),
        },
    }


def features(cfg: VGGConfig, p, s, x, *, train: bool, taps=None):
    """The convolutional stack (paper Section 2.1): 3x3 convs with padding 1, ReLU, five 2x2
    max-pools. ``[N, C, H, W] -> [N, 512, H / 32, W / 32]`` (floor at each pool).

    Returns ``(y, new_state)``; feature names (``taps``): ``features.{i}`` for every slot.
    """
    s = dict(s)
    for layer in plan(cfg):
        name = str(layer.index)
        if layer.kind == "conv":
            x = L.conv2d(p[name], x, padding=1)
        elif layer.kind == "bn":
            x, s[name] = L.batch_norm(p[name], s[name], x, train=train)
        elif layer.kind == "relu":  # in place unless the previous output was recorded as a feature
            x = L.relu_(x) if taps is None else L.relu(x)
        else:
            x = L.max_pool2d(x, 2, 2)
        x = L.tap(taps, f"features.{name}", x)
    return x, s


def classifier(p, x, *, dropout: float, train: bool, rng):
    """Three fully connected layers, dropout after the first two (paper Section 3.1):
    ``[N, 512 * 7 * 7] -> [N, num_classes]``."""
    x = L.dropout(L.relu_(L.linear(p["0"], x)), dropout, _key(rng, 0), train=train)  # fresh outputs: in place
    x = L.dropout(L.relu_(L.linear(p["3"], x)), dropout, _key(rng, 1), train=train)
    return L.linear(p["6"], x)


def _key(rng, i: int):
    return None if rng is None else vrandom.fold_in(rng, i)


def apply(cfg: VGGConfig, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``; any size >= 32x32 (the 7x7
    adaptive pool replaces the paper's fixed 224 input; below 32 the fifth pool has nothing left).
    """
    s = dict(state)
    y, new_features = features(cfg, params["features"], state.get("features", {}), x, train=train, taps=taps)
    if cfg.batch_norm:
        s["features"] = new_features
    if L.taps_complete(taps):
        return None, (s if train else state)
    y = L.adaptive_avg_pool2d(y, POOLED).flatten(1)
    logits = classifier(params["classifier"], y, dropout=cfg.dropout, train=train, rng=rng)
    return logits, (s if train else state)


FAMILY = Family(
    name="vgg",
    config=VGGConfig,
    init=init,
    apply=apply,
    min_size=lambda cfg: 32,
    paper=PAPER,
)

_PARAMS = {
    ("A", False): 132863336, ("A", True): 132868840,
    ("B", False): 133047848, ("B", True): 133053736,
    ("D", False): 138357544, ("D", True): 138365992,
    ("E", False): 143667240, ("E", True): 143678248,
}

for (_conf, _bn), _n in _PARAMS.items():
    _name = f"vgg{DEPTH[_conf]}" + ("_bn" if _bn else "")
    register(
        _name, FAMILY, params=_n, reference=Reference("torchvision", _name),
        deterministic_train={"dropout": 0.0},
        notes=f"configuration {_conf} of Table 1" + (", BatchNorm after every conv" if _bn else ""),
        configuration=_conf, batch_norm=_bn,
    )
