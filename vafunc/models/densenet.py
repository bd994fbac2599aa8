"""DenseNet-BC in torchvision's layout.

Huang et al. 2017, "Densely Connected Convolutional Networks" (arXiv:1608.06993), Table 1:
a 7x7/2 stem and 3x3/2 max pool, four dense blocks joined by transition layers (BN-ReLU-1x1
conv halving the channels, 2x2/2 average pool), a final BatchNorm, ReLU, global average pool and
a linear classifier. Every dense layer is the BC bottleneck "BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3)"
(Sec. 3, "Bottleneck layers") producing ``growth_rate`` (k) new channels that are concatenated
to everything before it in the block.

State-dict names are torchvision's: ``features.conv0``, ``features.norm0``,
``features.denseblock{b}.denselayer{l}.{norm1,conv1,norm2,conv2}``,
``features.transition{t}.{norm,conv}``, ``features.norm5``, ``classifier``.

Legacy checkpoints: torchvision's published DenseNet weights (2017) name the dense-layer modules
``norm.1``/``conv.1``/``norm.2``/``conv.2`` (``relu.N`` too) and predate BatchNorm's
``num_batches_tracked`` buffer. :func:`remap` translates both (see its docstring), so
``vafunc.from_state_dict`` loads those files directly.

DenseNet-264 (Table 1, k=32, blocks (6, 12, 64, 48)) has no torchvision builder; its reference is
``torchvision.models.DenseNet(32, (6, 12, 64, 48), 64)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import layers as L
from .. import random as vrandom
from ..registry import Family, Reference, check_config, register

PAPER = "Huang et al. 2017, Densely Connected Convolutional Networks, arXiv:1608.06993"


@dataclass(frozen=True)
class DenseNetConfig:
    """torchvision ``DenseNet`` keywords.

    ``growth_rate`` is k (new channels per dense layer), ``block_config`` the layers per dense
    block, ``num_init_features`` the stem width, ``bn_size`` the bottleneck width factor (the 1x1
    conv makes ``bn_size * k`` channels), ``drop_rate`` the dropout after every dense layer (train
    mode only; needs ``rng``). ``memory_efficient`` is accepted for torchvision compatibility and
    ignored: in torchvision it only trades memory for recomputation (gradient checkpointing), the
    function computed is the same.
    """

    growth_rate: int = 32
    block_config: tuple = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    num_classes: int = 1000
    memory_efficient: bool = False
    in_channels: int = 3

    def __post_init__(self):
        check_config(self, positive_ints=("growth_rate", "num_init_features", "bn_size", "num_classes", "in_channels"),
                     rates=("drop_rate",))
        try:
            blocks = tuple(int(n) for n in self.block_config)
        except TypeError:
            raise TypeError(f"block_config must be a sequence of ints, got {self.block_config!r}") from None
        if len(blocks) < 1 or min(blocks) < 1:
            raise ValueError(f"block_config must be positive layer counts, got {self.block_config!r}")
        object.__setattr__(self, "block_config", blocks)
        object.__setattr__(self, "drop_rate", float(self.drop_rate))
        object.__setattr__(self, "memory_efficient", bool(self.memory_efficient))


class BlockSpec(NamedTuple):
    in_features: int  # channels entering the dense block
    num_layers: int
    out_features: int  # channels leaving it (in_features + num_layers * k)
    transition: int | None  # channels after the following transition (None after the last block)
    first_layer: int  # global index of the block's first dense layer (dropout key stream)


def plan(cfg: DenseNetConfig) -> tuple[BlockSpec, ...]:
    """Channel bookkeeping of Table 1 (compression 0.5 in every transition, as in DenseNet-BC).

    Not cached: it is cheap, and dynamo traces through (and warns about) ``functools.lru_cache``."""
    c, first, out = cfg.num_init_features, 0, []
    for i, n in enumerate(cfg.block_config):
        end = c + n * cfg.growth_rate
        last = i == len(cfg.block_config) - 1
        out.append(BlockSpec(c, n, end, None if last else end // 2, first))
        c, first = (end if last else end // 2), first + n
    return tuple(out)


# --------------------------------------------------------------------------- blocks


def dense_layer(p, s, x, cfg: DenseNetConfig, *, train: bool, rng):
    """One BC dense layer (Sec. 3, "Bottleneck layers"): BN-ReLU-Conv1x1-BN-ReLU-Conv3x3.

    ``x [N, C_in, H, W]`` (the concatenation of all earlier features in the block)
    ``-> [N, k, H, W]``, the layer's new features, then dropout at ``drop_rate`` (train mode).
    """
    s = dict(s)
    y, s["norm1"] = L.batch_norm(p["norm1"], s["norm1"], x, train=train)
    y = L.conv2d(p["conv1"], L.relu_(y))
    y, s["norm2"] = L.batch_norm(p["norm2"], s["norm2"], y, train=train)
    y = L.conv2d(p["conv2"], L.relu_(y), padding=1)
    return L.dropout(y, cfg.drop_rate, rng, train=train), s


def dense_block(p, s, x, b: BlockSpec, cfg: DenseNetConfig, *, train: bool, rng, taps, name: str):
    """A dense block (Sec. 3, "Dense connectivity"): layer ``l`` sees ``[x_0, x_1, ..., x_{l-1}]``.

    ``x [N, in_features, H, W] -> [N, in_features + num_layers * k, H, W]``.
    """
    s = dict(s)
    features = [x]
    for j in range(b.num_layers):
        key = f"denselayer{j + 1}"
        layer_rng = None if rng is None else vrandom.fold_in(rng, b.first_layer + j)
        y, s[key] = dense_layer(p[key], s[key], torch.cat(features, 1), cfg, train=train, rng=layer_rng)
        features.append(L.tap(taps, f"{name}.{key}", y))
    return torch.cat(features, 1), s


def transition(p, s, x, *, train: bool):
    """Transition layer (Sec. 3, "Pooling layers"): BN-ReLU-Conv1x1 (halving the channels, the BC
    compression theta = 0.5) then 2x2/2 average pooling. ``[N, C, H, W] -> [N, C/2, H/2, W/2]``."""
    s = dict(s)
    y, s["norm"] = L.batch_norm(p["norm"], s["norm"], x, train=train)
    y = L.conv2d(p["conv"], L.relu_(y))
    return L.avg_pool2d(y, 2, 2), s


# --------------------------------------------------------------------------- init / apply


def _conv(ini, cin: int, cout: int, k: int) -> dict:
    """torchvision's DenseNet conv init: ``kaiming_normal_`` defaults, i.e. fan_in mode,
    ``std = sqrt(2 / (cin * k * k))``, no bias."""
    return ini.conv(cin, cout, k, scheme="normal", std=math.sqrt(2.0 / (cin * k * k)))


def init(cfg: DenseNetConfig, ini) -> dict:
    k, width = cfg.growth_rate, cfg.bn_size * cfg.growth_rate
    f = {"conv0": _conv(ini, cfg.in_channels, cfg.num_init_features, 7), "norm0": ini.batch_norm(cfg.num_init_features)}
    for i, b in enumerate(plan(cfg)):
        block = {}
        for j in range(b.num_layers):
            c = b.in_features + j * k
            block[f"denselayer{j + 1}"] = {
                "norm1": ini.batch_norm(c),
                "conv1": _conv(ini, c, width, 1),
                "norm2": ini.batch_norm(width),
                "conv2": _conv(ini, width, k, 3),
            }
        f[f"denseblock{i + 1}"] = block
        if b.transition is not None:
            f[f"transition{i + 1}"] = {
                "norm": ini.batch_norm(b.out_features),
                "conv": _conv(ini, b.out_features, b.transition, 1),
            }
    c = plan(cfg)[-1].out_features
    f["norm5"] = ini.batch_norm(c)
    classifier = ini.linear(c, cfg.num_classes)  # torch's default weight init ...
    classifier["bias"] = ini.zeros((cfg.num_classes,))  # ... and a zero bias, as torchvision
    return {"features": f, "classifier": classifier}


def apply(cfg: DenseNetConfig, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names (``taps``, torchvision's module paths): ``features.relu0`` (stride 2),
    ``features.pool0`` (4), every dense layer's new features
    ``features.denseblock{b}.denselayer{l}`` (k channels), every block
    ``features.denseblock{b}`` (strides 4, 8, 16, 32), every ``features.transition{t}`` and
    ``features.norm5`` (the final BatchNorm, before the last ReLU).
    """
    if train and cfg.drop_rate > 0.0:
        rng = L.require_rng(rng, f"DenseNet dropout (drop_rate {cfg.drop_rate})")
    p, s = params["features"], dict(state["features"])
    y, s["norm0"] = L.conv_bn(p["conv0"], p["norm0"], s["norm0"], x, train=train, act=L.relu, stride=2, padding=3)
    y = L.tap(taps, "features.relu0", y)
    y = L.tap(taps, "features.pool0", L.max_pool2d(y, 3, 2, 1))
    for i, b in enumerate(plan(cfg)):
        name = f"features.denseblock{i + 1}"
        y, s[f"denseblock{i + 1}"] = dense_block(
            p[f"denseblock{i + 1}"], s[f"denseblock{i + 1}"], y, b, cfg, train=train, rng=rng, taps=taps, name=name
        )
        y = L.tap(taps, name, y)
        if b.transition is not None:
            t = f"transition{i + 1}"
            y, s[t] = transition(p[t], s[t], y, train=train)
            y = L.tap(taps, f"features.{t}", y)
        if L.taps_complete(taps):
            return None, ({**state, "features": s} if train else state)
    y, s["norm5"] = L.batch_norm(p["norm5"], s["norm5"], y, train=train)
    y = L.tap(taps, "features.norm5", y)
    new_state = {**state, "features": s} if train else state
    if L.taps_complete(taps):
        return None, new_state
    logits = L.linear(params["classifier"], L.global_avg_pool(L.relu(y)))
    return logits, new_state


def min_size(cfg: DenseNetConfig) -> int:
    """Smallest H=W: the stem (7x7/2, 3x3/2 max pool) and each of the ``len(block_config) - 1``
    2x2/2 average pools must leave at least one pixel (29 for the four-block networks)."""
    n = 2 ** (len(cfg.block_config) - 1)  # the pool0 output must be at least this big
    # pool0 output = floor((c - 1) / 2) + 1 with c = conv0 output = floor((h - 1) / 2) + 1
    return 4 * (n - 1) + 1


# --------------------------------------------------------------------------- legacy checkpoints

#: torchvision's own pattern (``densenet._load_state_dict``) for the 2017 checkpoint names.
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def remap(cfg: DenseNetConfig, flat: dict) -> tuple[dict, list[str]]:
    """Translate the names of torchvision's published (2017) DenseNet checkpoints.

    1. ``...denselayerN.norm.1.weight`` -> ``...denselayerN.norm1.weight`` (likewise ``conv.2``,
       ``running_mean``/``running_var``): the regex torchvision applies in its loader.
    2. Those checkpoints predate BatchNorm's ``num_batches_tracked`` buffer; where a BatchNorm
       has ``running_mean`` but no ``num_batches_tracked``, it is added as ``tensor(0)`` (what
       ``nn.BatchNorm2d`` does when loading such a state_dict). It only feeds the momentum-free
       running average (unused by torchvision), so outputs do not depend on it.

    Returns ``(flat, notes)``: the notes (one per kind of change, with counts) become warnings.
    Checkpoints in current names pass through unchanged, with no notes.
    """
    out, renamed = {}, 0
    for k, v in flat.items():
        m = _LEGACY.match(k)
        if m:
            k, renamed = m.group(1) + m.group(2), renamed + 1
        out[k] = v
    notes = []
    if renamed:
        notes.append(f"renamed {renamed} legacy DenseNet keys ('norm.1' -> 'norm1', 'conv.2' -> 'conv2', ...)")
    return out, notes


FAMILY = Family(
    name="densenet",
    config=DenseNetConfig,
    init=init,
    apply=apply,
    min_size=min_size,
    paper=PAPER,
    remap=remap,
)

_DETERMINISTIC = {"drop_rate": 0.0}

for _depth, _k, _blocks, _init, _n in [
    (121, 32, (6, 12, 24, 16), 64, 7978856),
    (161, 48, (6, 12, 36, 24), 96, 28681000),
    (169, 32, (6, 12, 32, 32), 64, 14149480),
    (201, 32, (6, 12, 48, 32), 64, 20013928),
]:
    register(
        f"densenet{_depth}", FAMILY, params=_n, reference=Reference("torchvision", f"densenet{_depth}"),
        deterministic_train=_DETERMINISTIC, growth_rate=_k, block_config=_blocks, num_init_features=_init,
    )

register(
    "densenet264", FAMILY, params=33337704,
    reference=Reference(
        "torchvision", "DenseNet",
        kwargs=(("growth_rate", 32), ("block_config", (6, 12, 64, 48)), ("num_init_features", 64)),
    ),
    deterministic_train=_DETERMINISTIC,
    notes="Table 1 of the paper (k=32, blocks 6/12/64/48); torchvision has the class but no builder or "
    "weights; timm's densenet264d is a different network (k=48, deep stem).",
    growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64,
)
