"""ResNet, ResNeXt and Wide ResNet in torchvision's v1.5 layout (stride on the 3x3 conv).

He et al. 2016, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), Table 1;
Xie et al. 2017, "Aggregated Residual Transformations" (ResNeXt, arXiv:1611.05431);
Zagoruyko & Komodakis 2016, "Wide Residual Networks" (arXiv:1605.07146);
Hu et al. 2018, "Squeeze-and-Excitation Networks" (SE-ResNet / SE-ResNeXt, arXiv:1709.01507,
Fig. 3 and Table 1), in timm's layout (``seresnet50``, ``seresnext50_32x4d``);
Woo et al. 2018, "CBAM: Convolutional Block Attention Module" (CBAM-ResNet, arXiv:1807.06521,
Fig. 3 and Table 4), in timm's layout (``cbam_resnet50``).

State-dict names are torchvision's: ``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}``,
``layer{1..4}.{i}.bn{1,2,3}``, ``layer{1..4}.{i}.downsample.{0,1}``, ``fc``. timm's ResNet uses
the same names; its SE variants (``attn_layer="se"``) add ``layer{1..4}.{i}.se.fc1`` / ``.fc2``
(1x1 convs with bias) after the block's last BatchNorm and before ``downsample``.

SE-ResNet (paper Fig. 3): the squeeze-and-excitation gate rescales the residual branch's
channels after its last BatchNorm, before the shortcut is added. The squeeze width is timm's
``SEModule`` default, ``make_divisible(channels / 16, 8, round_limit=0)`` (reduction ratio 16 of
the paper's Table 1: 16, 32, 64, 128 for the four bottleneck stages). timm's init: every conv
weight ``kaiming_normal_(fan_out, relu)``, the SE conv biases keep torch's default uniform
``+-1/sqrt(fan_in)``, ``fc`` torch's default, and the last BatchNorm weight of every residual
branch zero (``zero_init_last=True``, which is ``zero_init_residual`` here).

CBAM-ResNet (paper Fig. 3): the same place holds timm's ``CbamModule`` (``attn_layer="cbam"``;
:meth:`vafunc.core.kit.Scope.cbam`) at ``layer{1..4}.{i}.se``: the channel gate
``se.channel.fc1/fc2`` (1x1 convs with bias, timm's ``mlp_bias=True``; reduction 16,
``make_divisible(c / 16, 1, round_limit=0)``) over the spatial mean and max, then the spatial gate
``se.spatial.conv.conv/bn`` (a 7x7 conv without bias and a BatchNorm) over the channel mean and
max. The init is the SE variants' (the spatial BatchNorm weight 1). pytorchcv's ``cbam_resnet50``
checkpoints (the official CBAM code's layout: linear MLP layers, the spatial gate over ``[max, mean]``)
load through :func:`remap`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from vafunc.core import layers as L
from vafunc.core import remat as R
from vafunc.core.blocks import make_divisible
from vafunc.core.kit import Scope, family, subkey
from vafunc.core.registry import Reference, check_config, register

PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385"
_SE = "Hu et al. 2018, Squeeze-and-Excitation Networks, arXiv:1709.01507"
_CBAM = "Woo et al. 2018, CBAM: Convolutional Block Attention Module, arXiv:1807.06521"

#: timm's SE convs: its ResNet init redraws every conv weight (kaiming normal, fan_out) and leaves
#: the SE biases at torch's default Conv2d init.
SE_INIT = "kaiming_fan_out_default_bias"

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
    """torchvision ``ResNet`` keywords, with ``norm_layer`` as ``norm`` (``"batch"``, or
    ``"group"``: GroupNorm with ``norm_groups`` groups, which must divide every width; timm's
    ``resnet50_gn``), plus three of timm's ``ResNet``
    for its SE and CBAM variants: ``attn_layer`` (timm's ``block_args=dict(attn_layer=...)``; ``"se"``,
    ``"cbam"`` (timm's ``CbamModule`` with ``mlp_bias=True``) or ``None``), ``drop_rate``
    (dropout before ``fc``) and ``drop_path_rate`` (stochastic depth,
    block ``b`` of ``B`` at ``drop_path_rate * b / (B - 1)``, timm's linear rule). timm's
    ``zero_init_last`` is ``zero_init_residual``."""

    block: str = "bottleneck"
    layers: tuple = (3, 4, 6, 3)
    num_classes: int = 1000
    zero_init_residual: bool = False
    groups: int = 1
    width_per_group: int = 64
    replace_stride_with_dilation: tuple | None = None
    in_channels: int = 3
    attn_layer: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm: str = "batch"
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group' (GroupNorm, norm_groups groups), got {self.norm!r}")
        if self.attn_layer not in (None, "se", "cbam"):
            raise ValueError(f"attn_layer must be None, 'se' or 'cbam', got {self.attn_layer!r}")
        if self.attn_layer == "cbam" and self.norm != "batch":
            raise ValueError("attn_layer='cbam' needs norm='batch' (timm's CBAM spatial gate is a BatchNorm)")
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
        check_config(
            self,
            positive_ints=("num_classes", "in_channels", "groups", "width_per_group", "norm_groups"),
            rates=("drop_rate", "drop_path_rate"),
        )


class BlockSpec(NamedTuple):
    inplanes: int
    width: int  # channels of the 3x3 conv(s)
    outplanes: int
    stride: int
    dilation: int  # dilation of the 3x3 conv
    groups: int  # groups of the 3x3 conv (ResNeXt cardinality)
    downsample: bool
    index: int = 0  # block number over all stages (its stochastic-depth key)
    drop_path: float = 0.0  # stochastic-depth rate of the residual branch


def se_channels(c: int) -> int:
    """timm's ``SEModule`` squeeze width: ``make_divisible(c / 16, 8, round_limit=0)``."""
    return make_divisible(c / 16, 8, round_limit=0.0)


def cbam_channels(c: int) -> int:
    """timm's ``ChannelAttn`` squeeze width: ``make_divisible(c / 16, 1, round_limit=0)``."""
    return make_divisible(c / 16, 1, round_limit=0.0)


def plan(cfg: ResNetConfig) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per-stage block specs, derived from the config (no mutable construction state)."""
    exp = EXPANSION[cfg.block]
    inplanes, dilation, stages, index = 64, 1, [], 0
    last = sum(cfg.layers) - 1
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
            rate = cfg.drop_path_rate * index / last if last else 0.0
            blocks.append(BlockSpec(inplanes, width, planes * exp, s, d, cfg.groups, down, index, rate))
            inplanes, index = planes * exp, index + 1
        stages.append(tuple(blocks))
    return tuple(stages)


# --------------------------------------------------------------------------- the network


def basic_block(m: Scope, x: Tensor, b: BlockSpec, cfg: ResNetConfig) -> Tensor:
    """BasicBlock (paper Fig. 2 left): two 3x3 convs and an identity/projection shortcut.

    ``x [N, inplanes, H, W] -> [N, outplanes, H/stride, W/stride]``.
    """
    y = m.conv_norm_act(x, b.width, 3, conv="conv1", norm="bn1", act="relu", stride=b.stride, padding=1)
    y = m.conv_norm_act(y, b.outplanes, 3, conv="conv2", norm="bn2", padding=1, zero_init=cfg.zero_init_residual)
    y = branch_tail(m, y, b, cfg)  # rebound first: the tensor before SE is freed before the shortcut's conv
    return L.add_relu_(y, shortcut(m, x, b))


def bottleneck(m: Scope, x: Tensor, b: BlockSpec, cfg: ResNetConfig) -> Tensor:
    """Bottleneck (paper Fig. 5 right; v1.5: the stride sits on the grouped 3x3 conv).

    ``x [N, inplanes, H, W] -> [N, outplanes, H/stride, W/stride]``; ``groups`` > 1 is ResNeXt.
    """
    y = m.conv_norm_act(x, b.width, 1, conv="conv1", norm="bn1", act="relu")
    y = m.conv_norm_act(
        y,
        b.width,
        3,
        conv="conv2",
        norm="bn2",
        act="relu",
        stride=b.stride,
        padding=b.dilation,
        dilation=b.dilation,
        groups=b.groups,
    )
    y = m.conv_norm_act(y, b.outplanes, 1, conv="conv3", norm="bn3", zero_init=cfg.zero_init_residual)
    y = branch_tail(m, y, b, cfg)  # as in basic_block
    return L.add_relu_(y, shortcut(m, x, b))


def branch_tail(m: Scope, y: Tensor, b: BlockSpec, cfg: ResNetConfig) -> Tensor:
    """The end of the residual branch: SE at ``se.fc1/fc2`` (timm's ``attn_layer="se"``) or CBAM at
    ``se.channel`` / ``se.spatial`` (``attn_layer="cbam"``), then
    stochastic depth at ``b.drop_path`` keyed by the block scope's key; ``y`` stays a fresh
    tensor (the sum is taken in place in it)."""
    if cfg.attn_layer == "se":
        y = m.block("se", Scope.squeeze_excite, y, se_channels(b.outplanes), init=SE_INIT, tap=False)
    elif cfg.attn_layer == "cbam":
        y = m.block("se", Scope.cbam, y, cbam_channels(b.outplanes), init=SE_INIT, tap=False)
    if b.drop_path:
        y = m.drop_path(y, b.drop_path, m.rng)
    return y


def shortcut(m: Scope, x: Tensor, b: BlockSpec) -> Tensor:
    """Identity, or the 1x1 projection ``downsample.{0: conv, 1: BN}`` when the shape changes."""
    if not b.downsample:
        return x
    return m.block("downsample", Scope.conv_norm_act, x, b.outplanes, 1, stride=b.stride, tap=False)


BLOCKS = {"basic": basic_block, "bottleneck": bottleneck}


def stage(m: Scope, x: Tensor, blocks: tuple, cfg: ResNetConfig) -> Tensor:
    for j, b in enumerate(blocks):
        x = m.block(str(j), BLOCKS[cfg.block], x, b, cfg, rng=subkey(m.rng, b.index))
    return x


def forward(m: Scope, cfg: ResNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: the stem activation ``relu`` (torchvision; timm's module path ``act1`` for the
    SE and GroupNorm models, which only timm has), stride 2, ``maxpool`` (4), every block ``layer{i}.{j}``
    and every stage ``layer1`` .. ``layer4``
    (strides 4, 8, 16, 32 without dilation).

    Random slots (train mode, non-zero rates only): ``m.key(0)`` the dropout before ``fc``
    (``drop_rate``); block ``b`` (counted over all stages) draws its stochastic depth from
    ``fold_in(m.key(1), b)``.
    """
    (y,) = body(m, cfg, x)
    return m.head(y, cfg.num_classes, rate=cfg.drop_rate, rng=m.key(0) if cfg.drop_rate else None)


def stem(m: Scope, x: Tensor, cfg: ResNetConfig) -> Tensor:
    """``conv1``, ``bn1``, the activation and ``maxpool``, in the model's own scope (``remat`` can
    recompute it as the block ``"stem"``: at 224 its three 112x112 maps are kept otherwise)."""
    act = "act1" if cfg.attn_layer or cfg.norm == "group" else "relu"
    y = m.tap(act, m.conv_norm_act(x, 64, 7, conv="conv1", norm="bn1", act="relu", act_name=act, stride=2, padding=3))
    return m.op("maxpool", L.max_pool2d, y, 3, 2, 1)


def body(m: Scope, cfg: ResNetConfig, x: Tensor, keep: int = 1) -> list[Tensor]:
    """The network without its head: the stem and the four stages; the outputs of the last ``keep``
    stages (``keep=2``: ``[layer3, layer4]``, what torchvision's segmentation models read through
    ``IntermediateLayerGetter``). Earlier stage outputs are not held: at 520x520 the dilated
    network's ``layer1`` alone is 69 MB a pair of images."""
    y = R.segment(m, "stem", stem, x, cfg, reads=("conv1", "bn1"))  # a block for remat= only
    k_blocks = m.key(1) if cfg.drop_path_rate else None
    outs = []
    for i, blocks in enumerate(plan(cfg)):
        y = m.block(f"layer{i + 1}", stage, y, blocks, cfg, rng=k_blocks)
        if i >= 4 - keep:
            outs.append(y)
    return outs


# --------------------------------------------------------------------------- pytorchcv's CBAM-ResNet checkpoints

#: pytorchcv's CBAM-ResNet names (a unit ``features.stage{s}.unit{u}`` is ``layer{s}.{u - 1}``) -> timm's
_PTCV_UNIT = re.compile(r"^features\.stage(\d+)\.unit(\d+)\.(.+)$")
_PTCV_PARTS = (
    (re.compile(r"^body\.conv(\d)\.conv\.(.+)$"), r"conv\1.\2"),
    (re.compile(r"^body\.conv(\d)\.bn\.(.+)$"), r"bn\1.\2"),
    (re.compile(r"^identity_conv\.conv\.(.+)$"), r"downsample.0.\1"),
    (re.compile(r"^identity_conv\.bn\.(.+)$"), r"downsample.1.\1"),
    (re.compile(r"^cbam\.ch_gate\.mlp\.(fc[12])\.(.+)$"), r"se.channel.\1.\2"),
    (re.compile(r"^cbam\.sp_gate\.conv\.(conv|bn)\.(.+)$"), r"se.spatial.conv.\1.\2"),
)
_PTCV_TOP = (("features.init_block.conv.conv.", "conv1."), ("features.init_block.conv.bn.", "bn1."), ("output.", "fc."))


def _pytorchcv_name(k: str) -> str | None:
    for old, new in _PTCV_TOP:
        if k.startswith(old):
            return new + k[len(old) :]
    m = _PTCV_UNIT.match(k)
    if m is None:
        return None
    for pattern, repl in _PTCV_PARTS:
        if pattern.match(m.group(3)):
            return f"layer{m.group(1)}.{int(m.group(2)) - 1}." + pattern.sub(repl, m.group(3))
    return None


def remap(cfg: ResNetConfig, flat: dict) -> tuple[dict, list[str]]:
    """Translate pytorchcv's CBAM-ResNet checkpoints (``cbam_resnet50``, whose trained weights
    pytorchcv publishes; the official CBAM code's layout) to timm's names: ``features.stage{s}.unit{u}``
    -> ``layer{s}.{u - 1}``, ``body.conv{k}.{conv,bn}`` -> ``conv{k}``/``bn{k}``, ``identity_conv`` ->
    ``downsample.{0,1}``, ``cbam.ch_gate.mlp.fc{1,2}`` -> ``se.channel.fc{1,2}`` (the linear
    ``[out, in]`` weights reshaped to 1x1 convs ``[out, in, 1, 1]``), ``cbam.sp_gate.conv`` ->
    ``se.spatial.conv`` (the 7x7 weight's two input channels swapped: pytorchcv stacks the channel
    ``[max, mean]``, timm ``[mean, max]``), the stem to ``conv1``/``bn1`` and ``output`` to ``fc``.

    Applies only to ``attn_layer="cbam"`` models and checkpoints with pytorchcv's stem
    (``features.init_block.conv.conv.weight``); keys it cannot place stay as they are, so the strict
    load lists them. Returns ``(flat, notes)``."""
    if cfg.attn_layer != "cbam" or "features.init_block.conv.conv.weight" not in flat:
        return flat, []
    out, renamed = {}, 0
    for k, v in flat.items():
        new = _pytorchcv_name(k)
        if new is None:
            out[k] = v
            continue
        if ".se.channel.fc" in new and new.endswith(".weight") and v.dim() == 2:
            v = v.reshape(*v.shape, 1, 1)
        elif new.endswith(".se.spatial.conv.conv.weight") and v.dim() == 4 and v.shape[1] == 2:
            v = v.flip(1)  # [max, mean] -> [mean, max]
        out[new], renamed = v, renamed + 1
    note = (
        f"translated {renamed} pytorchcv CBAM-ResNet keys to timm's layout ('features.stage1.unit1.body.conv1.conv' "
        "-> 'layer1.0.conv1', 'cbam.ch_gate.mlp' -> 'se.channel' as 1x1 convs, 'cbam.sp_gate' -> 'se.spatial' "
        "with its [max, mean] input channels swapped, ...)"
    )
    return out, [note]


FAMILY = family(
    "resnet",
    ResNetConfig,
    forward,
    paper=PAPER,
    defaults=lambda cfg: {"norm": cfg.norm, "norm_groups": cfg.norm_groups},
    remap=remap,
)

_RESNEXT = "Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks, arXiv:1611.05431"
_WIDE = "Zagoruyko & Komodakis 2016, Wide Residual Networks, arXiv:1605.07146"

for _depth, _n in [(18, 11689512), (34, 21797672), (50, 25557032), (101, 44549160), (152, 60192808)]:
    _block, _layers = STAGES[_depth]
    register(
        f"resnet{_depth}",
        FAMILY,
        params=_n,
        reference=Reference("torchvision", f"resnet{_depth}"),
        block=_block,
        layers=_layers,
    )

for _name, _depth, _g, _w, _n, _paper in [
    ("resnext50_32x4d", 50, 32, 4, 25028904, _RESNEXT),
    ("resnext101_32x8d", 101, 32, 8, 88791336, _RESNEXT),
    ("resnext101_64x4d", 101, 64, 4, 83455272, _RESNEXT),
    ("wide_resnet50_2", 50, 1, 128, 68883240, _WIDE),
    ("wide_resnet101_2", 101, 1, 128, 126886696, _WIDE),
]:
    register(
        _name,
        FAMILY,
        params=_n,
        reference=Reference("torchvision", _name),
        paper=_paper,
        block="bottleneck",
        layers=STAGES[_depth][1],
        groups=_g,
        width_per_group=_w,
    )


# timm's SE-ResNet / SE-ResNeXt (block_args=dict(attn_layer="se"); zero_init_last=True by default)
for _name, _g, _w, _n in [("seresnet50", 1, 64, 28088024), ("seresnext50_32x4d", 32, 4, 27559896)]:
    register(
        _name,
        FAMILY,
        params=_n,
        reference=Reference("timm", _name),
        paper=_SE,
        block="bottleneck",
        layers=STAGES[50][1],
        groups=_g,
        width_per_group=_w,
        attn_layer="se",
        zero_init_residual=True,
    )

# timm's CBAM-ResNet-50: resnet50 with block_args=dict(attn_layer=partial(CbamModule, mlp_bias=True))
# (the oracle builds the partial from the plain data below: tests/oracle.py, timm_block_args)
register(
    "cbam_resnet50",
    FAMILY,
    params=28089624,
    reference=Reference(
        "timm", "resnet50", kwargs=(("block_args", (("attn_layer", ("cbam", (("mlp_bias", True),))),)),)
    ),
    paper=_CBAM,
    block="bottleneck",
    layers=STAGES[50][1],
    attn_layer="cbam",
    zero_init_residual=True,
)

# timm's GroupNorm ResNet-50 (norm_layer=GroupNorm, 32 groups; zero_init_last): no coupling between
# samples, the ResNet for per-sample gradients and DP-SGD.
register(
    "resnet50_gn",
    FAMILY,
    params=25557032,
    reference=Reference("timm", "resnet50_gn"),
    paper="Wu & He 2018, Group Normalization, arXiv:1803.08494",
    block="bottleneck",
    layers=STAGES[50][1],
    norm="group",
    norm_groups=32,
    zero_init_residual=True,
)
