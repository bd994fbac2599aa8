"""ResNet, ResNeXt and Wide ResNet in torchvision's v1.5 layout (stride on the 3x3 conv).

He et al. 2016, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), Table 1;
Xie et al. 2017, "Aggregated Residual Transformations" (ResNeXt, arXiv:1611.05431);
Zagoruyko & Komodakis 2016, "Wide Residual Networks" (arXiv:1605.07146).

State-dict names are torchvision's: ``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}``,
``layer{1..4}.{i}.bn{1,2,3}``, ``layer{1..4}.{i}.downsample.{0,1}``, ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


from .. import layers as L
from ..registry import Family, Reference, check_config, register

PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385"

#: Table 1 of the paper: block type and blocks per stage.
STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
STAGE_PLANES = (64, 128, 256, 512)


@dataclass(frozen=True)
class ResNetConfig:
    """torchvision ``ResNet`` keywords (``norm_layer`` aside)."""

    block: str = "bottleneck"
    layers: tuple = (3, 4, 6, 3)
    num_classes: int = 1000
    zero_init_residual: bool = False
    groups: int = 1
    width_per_group: int = 64
    replace_stride_with_dilation: tuple | None = None
    in_channels: int = 3

    def __post_init__(self):
        if self.block not in EXPANSION:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {self.layers}")
        rswd = self.replace_stride_with_dilation
        rswd = (False, False, False) if rswd is None else tuple(bool(v) for v in rswd)
        if len(rswd) != 3:
            raise ValueError(f"replace_stride_with_dilation must have 3 entries, got {rswd}")
        object.__setattr__(self, "replace_stride_with_dilation", rswd)
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        if self.block == "basic" and any(rswd):
            raise ValueError("dilation > 1 is not supported with BasicBlock")
        check_config(self, positive_ints=("num_classes", "in_channels", "groups", "width_per_group"))


class BlockSpec(NamedTuple):
    inplanes: int
    width: int  # channels of the 3x3 conv(s)
    outplanes: int
    stride: int
    dilation: int  # dilation of the 3x3 conv
    groups: int  # groups of the 3x3 conv (ResNeXt cardinality)
    downsample: bool


def plan(cfg: ResNetConfig) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per-stage block specs, derived from the config (no mutable construction state)."""
    exp = EXPANSION[cfg.block]
    inplanes, dilation, stages = 64, 1, []
    for i, (planes, n) in enumerate(zip(STAGE_PLANES, cfg.layers)):
        stride = 1 if i == 0 else 2
        prev_dilation = dilation
        if i > 0 and cfg.replace_stride_with_dilation[i - 1]:
            dilation, stride = dilation * stride, 1
        width = planes if cfg.block == "basic" else int(planes * cfg.width_per_group / 64) * cfg.groups
        blocks = []
        for j in range(n):
            s, d = (stride, prev_dilation) if j == 0 else (1, dilation)
            down = j == 0 and (stride != 1 or inplanes != planes * exp)
            blocks.append(BlockSpec(inplanes, width, planes * exp, s, d, cfg.groups, down))
            inplanes = planes * exp
        stages.append(tuple(blocks))
    return tuple(stages)


# --------------------------------------------------------------------------- blocks


def basic_block(p, s, x, b: BlockSpec, *, train: bool):
    """BasicBlock (paper Fig. 2 left): two 3x3 convs and an identity/projection shortcut.

    ``x [N, inplanes, H, W] -> [N, outplanes, H/stride, W/stride]``.
    """
    s = dict(s)
    y, s["bn1"] = L.conv_bn(p["conv1"], p["bn1"], s["bn1"], x, train=train, act=L.relu, stride=b.stride, padding=1)
    y, s["bn2"] = L.conv_bn(p["conv2"], p["bn2"], s["bn2"], y, train=train, padding=1)
    shortcut, s = _shortcut(p, s, x, b, train)
    return L.add_relu_(y, shortcut), s


def bottleneck(p, s, x, b: BlockSpec, *, train: bool):
    """Bottleneck (paper Fig. 5 right; v1.5: the stride sits on the grouped 3x3 conv).

    ``x [N, inplanes, H, W] -> [N, outplanes, H/stride, W/stride]``; ``groups`` > 1 is ResNeXt.
    """
    s = dict(s)
    y, s["bn1"] = L.conv_bn(p["conv1"], p["bn1"], s["bn1"], x, train=train, act=L.relu)
    y, s["bn2"] = L.conv_bn(
        p["conv2"], p["bn2"], s["bn2"], y, train=train, act=L.relu,
        stride=b.stride, padding=b.dilation, dilation=b.dilation, groups=b.groups,
    )
    y, s["bn3"] = L.conv_bn(p["conv3"], p["bn3"], s["bn3"], y, train=train)
    shortcut, s = _shortcut(p, s, x, b, train)
    return L.add_relu_(y, shortcut), s


def _shortcut(p, s, x, b: BlockSpec, train: bool):
    if not b.downsample:
        return x, s
    ds = dict(s["downsample"])
    y, ds["1"] = L.conv_bn(p["downsample"]["0"], p["downsample"]["1"], ds["1"], x, train=train, stride=b.stride)
    s["downsample"] = ds
    return y, s


BLOCKS = {"basic": basic_block, "bottleneck": bottleneck}


# --------------------------------------------------------------------------- init / apply


def init(cfg: ResNetConfig, ini) -> dict:
    t = {"conv1": ini.conv(cfg.in_channels, 64, 7), "bn1": ini.batch_norm(64)}
    for i, stage in enumerate(plan(cfg)):
        layer = {}
        for j, b in enumerate(stage):
            if cfg.block == "basic":
                blk = {
                    "conv1": ini.conv(b.inplanes, b.width, 3),
                    "bn1": ini.batch_norm(b.width),
                    "conv2": ini.conv(b.width, b.outplanes, 3),
                    "bn2": ini.batch_norm(b.outplanes, zero_weight=cfg.zero_init_residual),
                }
            else:
                blk = {
                    "conv1": ini.conv(b.inplanes, b.width, 1),
                    "bn1": ini.batch_norm(b.width),
                    "conv2": ini.conv(b.width, b.width, 3, groups=b.groups),
                    "bn2": ini.batch_norm(b.width),
                    "conv3": ini.conv(b.width, b.outplanes, 1),
                    "bn3": ini.batch_norm(b.outplanes, zero_weight=cfg.zero_init_residual),
                }
            if b.downsample:
                blk["downsample"] = {"0": ini.conv(b.inplanes, b.outplanes, 1), "1": ini.batch_norm(b.outplanes)}
            layer[str(j)] = blk
        t[f"layer{i + 1}"] = layer
    t["fc"] = ini.linear(512 * EXPANSION[cfg.block], cfg.num_classes)
    return t


def apply(cfg: ResNetConfig, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names (``taps``): ``relu`` (stride 2), ``maxpool`` (4), every block ``layer{i}.{j}``
    and every stage ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32 without dilation).
    """
    p, s = params, dict(state)
    y, s["bn1"] = L.conv_bn(p["conv1"], p["bn1"], s["bn1"], x, train=train, act=L.relu, stride=2, padding=3)
    y = L.tap(taps, "relu", y)
    y = L.tap(taps, "maxpool", L.max_pool2d(y, 3, 2, 1))
    block = BLOCKS[cfg.block]
    for i, stage in enumerate(plan(cfg)):
        name = f"layer{i + 1}"
        ss = dict(s[name])
        for j, b in enumerate(stage):
            y, ss[str(j)] = block(p[name][str(j)], ss[str(j)], y, b, train=train)
            y = L.tap(taps, f"{name}.{j}", y)
        s[name] = ss
        y = L.tap(taps, name, y)
        if L.taps_complete(taps):
            return None, (s if train else state)
    logits = L.linear(p["fc"], L.global_avg_pool(y))
    return logits, (s if train else state)


FAMILY = Family(
    name="resnet",
    config=ResNetConfig,
    init=init,
    apply=apply,
    min_size=lambda cfg: 1,
    paper=PAPER,
)

_RESNEXT = "Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks, arXiv:1611.05431"
_WIDE = "Zagoruyko & Komodakis 2016, Wide Residual Networks, arXiv:1605.07146"

for _depth, _n in [(18, 11689512), (34, 21797672), (50, 25557032), (101, 44549160), (152, 60192808)]:
    _block, _layers = STAGES[_depth]
    register(
        f"resnet{_depth}", FAMILY, params=_n, reference=Reference("torchvision", f"resnet{_depth}"),
        block=_block, layers=_layers,
    )

for _name, _depth, _g, _w, _n, _paper in [
    ("resnext50_32x4d", 50, 32, 4, 25028904, _RESNEXT),
    ("resnext101_32x8d", 101, 32, 8, 88791336, _RESNEXT),
    ("resnext101_64x4d", 101, 64, 4, 83455272, _RESNEXT),
    ("wide_resnet50_2", 50, 1, 128, 68883240, _WIDE),
    ("wide_resnet101_2", 101, 1, 128, 126886696, _WIDE),
]:
    register(
        _name, FAMILY, params=_n, reference=Reference("torchvision", _name), paper=_paper,
        block="bottleneck", layers=STAGES[_depth][1], groups=_g, width_per_group=_w,
    )
