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
``norm.1``/``conv.1``/``norm.2``/``conv.2`` (``relu.N`` too); :func:`remap` renames them, so
``vafunc.from_state_dict`` loads those files directly. (They also predate BatchNorm's
``num_batches_tracked`` buffer; ``from_state_dict`` fills that in for every family.)

DenseNet-264 (Table 1, k=32, blocks (6, 12, 64, 48)) has no torchvision builder; its reference is
``torchvision.models.DenseNet(32, (6, 12, 64, 48), 64)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family, subkey
from vafunc.core.registry import Reference, check_config, register

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

    def __post_init__(self) -> None:
        check_config(
            self,
            positive_ints=("growth_rate", "num_init_features", "bn_size", "num_classes", "in_channels"),
            rates=("drop_rate",),
        )
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
    num_layers: int
    transition: int | None  # channels after the following transition (None after the last block)
    first_layer: int  # global index of the block's first dense layer (dropout key stream)


def plan(cfg: DenseNetConfig) -> tuple[BlockSpec, ...]:
    """Channel bookkeeping of Table 1 (compression 0.5 in every transition, as in DenseNet-BC).

    Not cached: it is cheap, and dynamo traces through (and warns about) ``functools.lru_cache``."""
    c, first, out = cfg.num_init_features, 0, []
    for i, n in enumerate(cfg.block_config):
        end = c + n * cfg.growth_rate
        last = i == len(cfg.block_config) - 1
        out.append(BlockSpec(n, None if last else end // 2, first))
        c, first = end // 2, first + n
    return tuple(out)


# --------------------------------------------------------------------------- the network


def dense_layer(m: Scope, x: Tensor, cfg: DenseNetConfig) -> Tensor:
    """One BC dense layer (Sec. 3, "Bottleneck layers"): BN-ReLU-Conv1x1-BN-ReLU-Conv3x3.

    ``x [N, C_in, H, W]`` (the concatenation of all earlier features in the block)
    ``-> [N, k, H, W]``, the layer's new features, then dropout at ``drop_rate`` (train mode,
    keyed by ``m.rng``).
    """
    y = m.op("relu1", L.relu_, m.batch_norm("norm1", x), tap=False)
    y = m.conv("conv1", y, cfg.bn_size * cfg.growth_rate, 1, padding=0)
    y = m.op("relu2", L.relu_, m.batch_norm("norm2", y), tap=False)
    y = m.conv("conv2", y, cfg.growth_rate, 3, padding=1)
    return m.dropout(y, cfg.drop_rate, m.rng) if cfg.drop_rate else y


def dense_block(m: Scope, x: Tensor, b: BlockSpec, cfg: DenseNetConfig) -> Tensor:
    """A dense block (Sec. 3, "Dense connectivity"): layer ``l`` sees ``[x_0, x_1, ..., x_{l-1}]``.

    ``x [N, C, H, W] -> [N, C + num_layers * k, H, W]``. Layer ``l`` of the network (counted
    over all blocks) drops out with key ``fold_in(rng, l)``.
    """
    features = [x]
    for j in range(b.num_layers):
        y = m.block(
            f"denselayer{j + 1}", dense_layer, torch.cat(features, 1), cfg, rng=subkey(m.rng, b.first_layer + j)
        )
        features.append(y)
    return torch.cat(features, 1)


def transition(m: Scope, x: Tensor, cout: int) -> Tensor:
    """Transition layer (Sec. 3, "Pooling layers"): BN-ReLU-Conv1x1 (halving the channels, the BC
    compression theta = 0.5) then 2x2/2 average pooling. ``[N, C, H, W] -> [N, C/2, H/2, W/2]``."""
    y = m.conv("conv", m.op("relu", L.relu_, m.batch_norm("norm", x), tap=False), cout, 1, padding=0)
    return m.op("pool", L.avg_pool2d, y, 2, 2, tap=False)


def features(m: Scope, x: Tensor, cfg: DenseNetConfig) -> Tensor:
    """torchvision's ``features``: the stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), the dense
    blocks and transitions, the final BatchNorm ``norm5`` (its ReLU is the head's).
    ``[N, C, H, W] -> [N, C', H / 32, W / 32]``; the blocks' dropout keys come from ``m.rng``."""
    y = m.conv_norm_act(x, cfg.num_init_features, 7, conv="conv0", norm="norm0", act="relu", act_name="relu0", stride=2)
    y = m.tap("relu0", y)
    y = m.op("pool0", L.max_pool2d, y, 3, 2, 1)
    for i, b in enumerate(plan(cfg)):
        y = m.block(f"denseblock{i + 1}", dense_block, y, b, cfg, rng=m.rng)
        if b.transition is not None:
            y = m.block(f"transition{i + 1}", transition, y, b.transition, sequential=True)
    return m.tap("norm5", m.batch_norm("norm5", y))


def forward(m: Scope, cfg: DenseNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (torchvision's module paths): ``features.relu0`` (stride 2),
    ``features.pool0`` (4), every dense layer's new features
    ``features.denseblock{b}.denselayer{l}`` (k channels), every block
    ``features.denseblock{b}`` (strides 4, 8, 16, 32), every ``features.transition{t}`` and
    ``features.norm5`` (the final BatchNorm, before the last ReLU).
    """
    y = m.block("features", features, x, cfg, rng=m.rng, tap=False, sequential=True)
    return m.head(L.relu(y), cfg.num_classes, name="classifier")  # not in place: norm5 may be a tap


# --------------------------------------------------------------------------- legacy checkpoints

#: torchvision's own pattern (``densenet._load_state_dict``) for the 2017 checkpoint names.
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def remap(cfg: DenseNetConfig, flat: dict) -> tuple[dict, list[str]]:
    """Translate the names of torchvision's published (2017) DenseNet checkpoints.

    ``...denselayerN.norm.1.weight`` -> ``...denselayerN.norm1.weight`` (likewise ``conv.2``,
    ``running_mean``/``running_var``): the regex torchvision applies in its loader. The missing
    ``num_batches_tracked`` buffers of those files are not this function's business:
    ``vafunc.from_state_dict`` adds them as ``tensor(0)`` for any family, after the remap.

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


FAMILY = family(
    "densenet",
    DenseNetConfig,
    forward,
    paper=PAPER,
    remap=remap,
    # torchvision: kaiming_normal_ convs (fan_in), nn.Linear's init with a zero bias
    defaults={"conv": "kaiming_normal", "linear": "torch_default_zero_bias"},
)

for _depth, _k, _blocks, _init, _n in [
    (121, 32, (6, 12, 24, 16), 64, 7978856),
    (161, 48, (6, 12, 36, 24), 96, 28681000),
    (169, 32, (6, 12, 32, 32), 64, 14149480),
    (201, 32, (6, 12, 48, 32), 64, 20013928),
]:
    register(
        f"densenet{_depth}",
        FAMILY,
        params=_n,
        reference=Reference("torchvision", f"densenet{_depth}"),
        growth_rate=_k,
        block_config=_blocks,
        num_init_features=_init,
    )

register(
    "densenet264",
    FAMILY,
    params=33337704,
    reference=Reference(
        "torchvision",
        "DenseNet",
        kwargs=(("growth_rate", 32), ("block_config", (6, 12, 64, 48)), ("num_init_features", 64)),
    ),
    notes="Table 1 of the paper (k=32, blocks 6/12/64/48); torchvision has the class but no builder or "
    "weights; timm's densenet264d is a different network (k=48, deep stem).",
    growth_rate=32,
    block_config=(6, 12, 64, 48),
    num_init_features=64,
)
